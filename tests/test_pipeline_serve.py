"""``offramp serve --pipeline-stages 2`` against a real tritonserver on a tiny model: generate and
generate_stream answer as the single-process engine does; killing stage 1 mid-request gives the
client an error within 30 s, the server turns not ready, ``offramp serve`` exits non-zero and no
process (stage, stub, server) is left behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from live_server import (
    STAGE_MODULE,
    Server,
    descendants,
    free_ports,
    serve_command,
    start_wrapper,
    stop_tree,
    wait_gone,
)
from offramp import EngineConfig, SamplingParams
from offramp_client import OfframpClient
from offramp_client.client import OfframpError

pytestmark = [pytest.mark.integration]
PROMPT = "w1 w2 w3 w4 w5"
SETTINGS = ("--num-threads", "1", "--layers-per-block", "1", "--page-size", "4", "--raw", "--kv-budget-mb", "8")


@pytest.fixture(scope="module")
def pipeline_server(tmp_path_factory, tiny_models):
    log = tmp_path_factory.mktemp("pipeline") / "server.log"
    http, grpc, metrics = free_ports(3)
    cmd = serve_command(tiny_models["llama"], http, grpc, metrics, "--pipeline-stages", "2", *SETTINGS)
    proc = start_wrapper(cmd, log)
    srv = Server(http, grpc, metrics, log)
    try:
        deadline = time.monotonic() + 300
        while not srv.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"offramp serve --pipeline-stages 2 did not become ready:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield proc, srv
    finally:
        stop_tree(proc)


@pytest.fixture(scope="module")
def offline(tiny_models):
    from offramp.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=str(tiny_models["llama"]), num_threads=1, layers_per_block=1, page_size=4, use_chat_template=False
    )
    return LLMEngine(config).generate([PROMPT], SamplingParams(max_tokens=16))[0]


def _stages(proc) -> list:
    return [p for p in descendants(proc.pid) if STAGE_MODULE in p.argv[1:3]]


def test_generate_and_stream_match_the_single_process_engine(pipeline_server, offline):
    proc, srv = pipeline_server
    assert len(_stages(proc)) == 2  # one stage process per served model (offramp, offramp_chat)
    status, body = srv.post(
        "generate",
        {"text_input": PROMPT, "exclude_input_in_output": True, "sampling_parameters": json.dumps({"max_tokens": 16})},
    )
    assert status == 200, body
    assert body["text_output"] == offline.text and body["exit_layers"] == offline.exit_layers
    chunks = list(OfframpClient(f"127.0.0.1:{srv.http}").stream(PROMPT, max_tokens=16))
    assert "".join(c.text for c in chunks) == offline.text
    assert [d for c in chunks for d in c.exit_layers] == offline.exit_layers


def test_killing_stage_one_fails_the_request_and_stops_the_server(pipeline_server):
    proc, srv = pipeline_server
    client = OfframpClient(f"127.0.0.1:{srv.http}")
    outcome: dict = {}

    def long_request() -> None:
        try:
            for _ in client.stream("w1 w2 w3", max_tokens=400):
                outcome.setdefault("first", time.monotonic())
        except OfframpError as exc:
            outcome["error"], outcome["at"] = str(exc), time.monotonic()

    thread = threading.Thread(target=long_request, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while "first" not in outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "first" in outcome, "the request never started streaming"
    stages, tree = _stages(proc), descendants(proc.pid)
    killed = time.monotonic()
    for stage in stages:
        os.kill(stage.pid, signal.SIGKILL)
    thread.join(60)
    assert "error" in outcome and "stage 1" in outcome["error"], outcome
    assert outcome["at"] - killed < 30
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not srv.ready()
    assert proc.poll() not in (None, 0), "offramp serve kept running (or exited 0) with a failed model"
    left = wait_gone(tree, 30)
    assert left == set(), f"processes left behind: {left}"
