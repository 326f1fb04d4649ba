"""Deployment files that cannot run here (no Docker engine, no GPU) pass real validators (hadolint,
the Compose specification's JSON schema) and say the right things."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
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


def test_compose_openai_profile_runs_the_gateway_against_the_offramp_service():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]["openai"]
    assert svc["profiles"] == ["openai"] and svc["image"] == compose["services"]["offramp"]["image"]
    assert svc["depends_on"]["offramp"]["condition"] == "service_healthy"
    command = svc["command"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'{command[0]} = "offramp_gateway.cli:main"' in pyproject  # the console script the image installs
    assert "--triton-url=offramp:8001" in command and "--host=0.0.0.0" in command
    assert "127.0.0.1:9000:9000" in svc["ports"] and "/health" in " ".join(svc["healthcheck"]["test"])


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


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (it is in the dev extra of pyproject.toml)")
    return path


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_passes_the_compose_specification_schema():
    cmd = [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_copies_every_package_the_engines_import():
    where = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = set(re.findall(r"^COPY (\S+) \./\1$", (REPO / "docker" / "Dockerfile").read_text(), re.M))
    assert set(where) <= copied, f"the image does not copy {sorted(set(where) - copied)}"


def test_gpu_settings_use_the_gpu():
    from offramp.serving.serving_config import load_serving_config
    from offramp.serving.triton_adapter import instance_device

    cfg = load_serving_config(REPO / "docker" / "engine.gpu.json")
    assert cfg.engine.device == "cuda" and cfg.engine.dtype == "bfloat16" and 0 < cfg.engine.kv_budget_fraction < 1
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "KIND_GPU" in dockerfile and "engine.gpu.json /models/offramp/1/engine.json" in dockerfile
    gpu_instance = {"model_instance_kind": "GPU", "model_instance_device_id": "2"}
    assert instance_device(gpu_instance, "cuda") == "cuda:2" and instance_device(gpu_instance, None) == "cuda:2"
    assert instance_device(gpu_instance, "cuda:1") == "cuda:1"  # engine.json's own choice stands
    assert instance_device({"model_instance_kind": "CPU"}, None) is None


def test_kubernetes_manifests_pass_the_kubernetes_schemas():
    manifests = sorted((REPO / "deploy").glob("*.yaml"))
    assert manifests
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", *map(str, manifests)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {doc["kind"] for path in manifests for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    deployment = next(
        d for p in manifests for d in yaml.safe_load_all(p.read_text()) if d and d["kind"] == "Deployment"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/ready"
