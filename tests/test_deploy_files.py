"""Deployment files that cannot run here (no Docker engine, no GPU) still parse and say the right things."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_file():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]["offramp"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "/v2/health/ready" in " ".join(svc["healthcheck"]["test"])
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")
    assert svc["shm_size"] and {"127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"} <= set(
        svc["ports"]
    )
    command = " ".join(svc["command"])
    assert "--model-control-mode=none" in command and "--http-restricted-api=" in command
    assert (REPO / svc["build"]["dockerfile"]).is_file()


def test_perf_input_data():
    data = json.loads((REPO / "perf" / "input_data.json").read_text())["data"]
    assert len(data) >= 10
    for row in data:
        assert set(row) == {"text_input", "stream", "sampling_parameters"}
        params = json.loads(row["sampling_parameters"][0])
        assert params == {"max_tokens": 64, "ignore_eos": True} and row["stream"] == [True]


def test_model_config_is_decoupled_and_names_the_vllm_tensors():
    text = (REPO / "model_repository" / "offramp" / "config.pbtxt").read_text()
    assert "decoupled: true" in text and 'backend: "python"' in text
    for name in (
        "text_input",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
        "text_output",
        "finish_reason",
        "num_input_tokens",
        "num_output_tokens",
        "exit_layers",
    ):
        assert f'name: "{name}"' in text


def test_chat_model_config_is_sequence_batched_with_the_same_tensors():
    chat = (REPO / "model_repository" / "offramp_chat" / "config.pbtxt").read_text()
    plain = (REPO / "model_repository" / "offramp" / "config.pbtxt").read_text()
    assert "decoupled: true" in chat and "sequence_batching" in chat and "oldest" in chat
    for control in ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_CORRID"):
        assert control in chat
    for line in plain.splitlines():
        if line.strip().startswith("{ name:"):
            assert line.strip().rstrip(",") in chat, line
    engine = json.loads((REPO / "model_repository" / "offramp_chat" / "1" / "engine.json").read_text())
    assert engine == json.loads((REPO / "model_repository" / "offramp" / "1" / "engine.json").read_text())
