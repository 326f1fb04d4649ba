"""Blocks and their K/V split over devices (``--devices cpu,cpu``) and over pipeline-stage processes
(``--pipeline-stages 2``, gloo): greedy outputs token-identical to the single-device engine (batched,
exits off and on with both KV fills, preemption, a session's second turn, a cancellation), placement,
one-line errors for bad input, and a stage that dies or hangs (an error, no process left behind)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.pipeline.placement import partition, place
from offramp.pipeline.transport import StageError

PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [20, 21] * 8, [40], [1, 2], [5] * 9, [60, 61, 62], [99, 98], [17] * 3]
PROMPTS += [[33, 34, 35, 36, 37]]
GREEDY = SamplingParams(max_tokens=12)
EXITS = SamplingParams(max_tokens=12, exit_policy="similarity", exit_threshold=0.6)
PLACEMENTS = {"devices": {"devices": ("cpu", "cpu")}, "stages": {"pipeline_stages": 2}}


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """Engines here run one thread each (``num_threads=1`` sets torch's process-wide count): later
    modules get the count back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _config(tiny_models, **kwargs) -> EngineConfig:
    base = dict(model=str(tiny_models["llama"]), page_size=4, layers_per_block=1, num_threads=1, num_pages=24)
    base["min_exit_layer"] = 1  # tokens may leave at every block end
    return EngineConfig(**{**base, **kwargs})  # 24 pages hold fewer than the 10 prompts: preemption


def _transcript(engine: LLMEngine) -> dict:
    """Everything the equivalence tests compare: batched greedy with preemption, exits, a session's
    two turns, a batch with one request cancelled mid-flight, a shared prompt prefix; pages all back
    at the end."""
    out: dict = {}
    greedy = engine.generate(PROMPTS, GREEDY)
    out["greedy"] = [o.token_ids for o in greedy]
    out["preemptions"] = sum(o.num_preemptions for o in greedy)
    exits = engine.generate(PROMPTS, EXITS)
    out["exits"] = [(o.token_ids, o.exit_layers) for o in exits]
    first = _run(engine, "turn-1", [4, 5, 6, 7, 8], "chat")
    second = _run(engine, "turn-2", [4, 5, 6, 7, 8, *first.output_token_ids, 9, 10], "chat")
    out["session"] = (first.output_token_ids, second.output_token_ids, second.num_cached_tokens)
    engine.end_session("chat")
    seqs = [engine.add_request(f"c{i}", p, GREEDY) for i, p in enumerate(PROMPTS[:4])]
    engine.step()
    engine.step()
    engine.abort("c1")
    while engine.has_work:
        engine.step()
    out["cancelled"] = [(s.output_token_ids, s.finish_reason.value) for s in seqs]
    shared = [50, 51, 52, 53, 54, 55, 56, 57]  # two full pages of 4 tokens
    first = engine.add_request("p1", [*shared, 9, 10], GREEDY)
    engine.step()  # its prompt is computed: its full pages are registered
    second = engine.add_request("p2", [*shared, 11], GREEDY)
    while engine.has_work:
        engine.step()
    out["prefix"] = (first.output_token_ids, second.output_token_ids, second.num_cached_tokens)
    engine.pages.check_invariants()
    out["pages_used"] = engine.pages.num_used_pages
    return out


def _run(engine: LLMEngine, request_id: str, ids: list[int], session_id: str):
    seq = engine.add_request(request_id, ids, GREEDY, session_id=session_id)
    while not seq.is_finished:
        engine.step()
    return seq


@pytest.fixture(scope="module")
def references(tiny_models) -> dict[str, dict]:
    """The single-device engine's transcripts, per KV fill."""
    return {fill: _transcript(LLMEngine(_config(tiny_models, kv_fill=fill))) for fill in ("propagate", "recompute")}


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_split_engine_is_token_identical_to_one_device(tiny_models, references, placement, kv_fill):
    engine = LLMEngine(_config(tiny_models, kv_fill=kv_fill, **PLACEMENTS[placement]))
    try:
        assert [s.layers for s in engine.placement.stages] == [(0, 2), (2, 4)]
        ours = _transcript(engine)
    finally:
        engine.close()
    ref = references[kv_fill]
    assert ref["preemptions"] > 0, "the small KV store preempted nothing"
    depths = [d for _, layers in ref["exits"] for d in layers]
    assert 0 < sum(d < 4 for d in depths) < len(depths), "exits should happen for some tokens, not all"
    assert ref["cancelled"][1][1] == "abort" and ref["session"][2] > 0 and ref["prefix"][2] == 8
    assert ours == ref
    assert ours["pages_used"] == 0


def test_stage_kv_holds_only_its_layers(tiny_models):
    engine = LLMEngine(_config(tiny_models, devices=("cpu", "cpu"), kv_budget_bytes=4096, num_pages=None))
    per_page_layer = 2 * 2 * 16 * 4 * 4  # K and V, 2 KV heads x 16 dims, float32, 4 tokens
    assert engine.pages.num_pages == 4096 // (2 * per_page_layer)  # each stage's budget holds its 2 layers
    engine.close()
    engine = LLMEngine(_config(tiny_models, pipeline_stages=2, kv_budget_bytes=4096, num_pages=None))
    try:
        assert engine.pages.num_pages == 4096 // (2 * per_page_layer)
        assert [len(k) for k in engine.kv.k] == [8, 8, 0, 0]  # 2 pages of 4 slots, stage 0's layers only
        assert len(engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4))[0].token_ids) == 4
    finally:
        engine.close()


def test_partition_balances_cost_and_gives_stage_zero_less_on_a_tie():
    assert partition([1.0] * 15, 2) == [(0, 7), (7, 15)]
    assert partition([1.0, 1.0, 1.0, 3.0], 2) == [(0, 3), (3, 4)]  # by cost, not by count
    assert partition([2.0, 2.0, 2.0, 2.0, 2.0, 1.0], 3) == [(0, 2), (2, 4), (4, 6)]
    placement = place([(0, 2), (2, 4), (4, 5)], ["cpu", "cpu"], [2.0, 2.0, 1.0], False)
    assert [s.layers for s in placement.stages] == [(0, 2), (2, 5)]
    assert placement.balanced_by == "measured block cost"
    assert "stage 1 on cpu: blocks 1-2, layers 2-4" in placement.describe()
    assert placement.as_dict()["stage_first_layers"] == [0, 2]
    with_head = place([(2 * i, 2 * i + 2) for i in range(15)], ["cpu", "cpu"], [2.0] * 15, True, 8.0)
    assert [s.layers for s in with_head.stages] == [(0, 10), (10, 30)]  # the default model: its head weighs 8 layers


def test_uneven_blocks_are_timed(tiny_models):
    engine = LLMEngine(_config(tiny_models, devices=("cpu", "cpu"), block_boundaries=(0, 1)))
    assert engine.placement.balanced_by == "measured block cost (stage 0 also runs the LM head)"
    assert [s.layers for s in engine.placement.stages] == [(0, 1), (1, 4)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": ("cpu", "cpu", "cpu"), "layers_per_block": 2}, "3 stages for 2 blocks"),
        ({"devices": ("cpu", "cuda:7")}, "devices: stage 1: cuda:7 is not available on this host"),
        ({"devices": ("cpu", "tpu")}, "devices: cpu,tpu is not a list of cpu, cuda, cuda:N"),
        ({"pipeline_stages": 3, "devices": ("cpu", "cpu")}, "2 devices for 3 pipeline stages"),
        ({"pipeline_stages": 0}, "pipeline_stages: must be a positive integer"),
        ({"devices": ("cpu", "cpu"), "backend": "onnxruntime"}, "does not run split over devices or stages"),
        (
            {"devices": ("cpu", "cpu"), "block_boundaries": (0, 1), "num_pages": None, "kv_budget_bytes": 2048},
            "stage 1 (cpu, layers 1-3) cannot hold one sequence: its budget of 2.0 KiB holds 0 pages; one page of 4 "
            "tokens over its 3 layers needs 3.0 KiB",
        ),
    ],
)
def test_bad_placement_is_one_line_naming_the_stage(tiny_models, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        LLMEngine(_config(tiny_models, **kwargs))
    assert "\n" not in str(info.value)


def test_a_stage_process_too_small_for_its_kv_is_named_and_stopped(tiny_models):
    config = _config(tiny_models, pipeline_stages=2, block_boundaries=(0, 1), num_pages=None, kv_budget_bytes=2048)
    with pytest.raises(ValueError, match=r"stage 1 \(cpu, layers 1-3\) cannot hold one sequence"):
        LLMEngine(config)


def _worker_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"offramp.pipeline.worker" in argv[1:3] and int(entry) in _children():
                pids.add(int(entry))
    return pids


def _children() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in _children():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_failed_stage_gives_an_error_and_leaves_no_process(tiny_models, how):
    engine = LLMEngine(_config(tiny_models, pipeline_stages=2, stage_timeout_s=3.0, num_pages=200))
    pid = engine.backend.processes.procs[0].pid
    try:
        for i, prompt in enumerate(PROMPTS[:4]):
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=200))
        engine.step()
        os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        errors: list[BaseException] = []

        def drive() -> None:
            try:
                for _ in range(100):
                    engine.step()
            except BaseException as exc:  # noqa: BLE001 - the test inspects whatever ended the steps
                errors.append(exc)

        steps = threading.Thread(target=drive, daemon=True)
        steps.start()
        steps.join(timeout=120)  # a bounded wait: a failed stage must end the steps, not hang them
        assert not steps.is_alive(), "the steps still wait on a dead or hung stage"
        assert len(errors) == 1 and isinstance(errors[0], StageError) and "stage 1" in str(errors[0])
        assert "\n" not in str(errors[0])
        assert engine.failure is not None
        with pytest.raises(StageError):
            engine.step()  # and every later step, at once
    finally:
        engine.close()
    assert _gone(pid)


def test_close_stops_every_stage_and_heartbeat_sees_a_death(tiny_models):
    engine = LLMEngine(_config(tiny_models, pipeline_stages=2, stage_timeout_s=2.0))
    pid = engine.backend.processes.procs[0].pid
    assert pid in _worker_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.failure is None and time.monotonic() < deadline:  # idle: only the heartbeat can notice
        time.sleep(0.1)
    assert engine.failure is not None and f"pid {pid}" in engine.failure
    engine.close()
    engine.close()  # idempotent
    assert _gone(pid)
    healthy = LLMEngine(_config(tiny_models, pipeline_stages=2))
    pid = healthy.backend.processes.procs[0].pid
    healthy.close()
    assert _gone(pid)


def test_served_engine_fails_requests_and_turns_fatal_when_a_stage_dies(tiny_models):
    from offramp.serving.async_engine import AsyncEngine
    from offramp.serving.events import RequestHandle
    from offramp.serving.requests import GenerateRequest, RequestError

    fatal, done, events = threading.Event(), threading.Event(), []
    engine = AsyncEngine(
        lambda: LLMEngine(_config(tiny_models, pipeline_stages=2, stage_timeout_s=3.0, num_pages=200)),
        on_fatal=lambda reason: fatal.set(),
    )
    engine.start()
    pid = engine.engine.backend.processes.procs[0].pid

    def emit(event):
        events.append(event)
        if event.finished:
            done.set()

    try:
        engine.submit(
            RequestHandle("long", GenerateRequest("w1 w2 w3", SamplingParams(max_tokens=400), stream=True), emit)
        )
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        assert done.wait(30) and fatal.wait(30)
        assert events[-1].error is not None and "stage 1" in str(events[-1].error)
        assert events[-1].error.code == "unavailable"
        with pytest.raises(RequestError, match="the model failed"):
            engine.submit(RequestHandle("later", GenerateRequest("w1", SamplingParams(max_tokens=2)), emit))
    finally:
        engine.shutdown(timeout=5)
    assert _gone(pid)


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_three_stages_with_and_without_micro_batches(tiny_models, references, micro_batches):
    engine = LLMEngine(_config(tiny_models, pipeline_stages=3, micro_batches=micro_batches))
    try:
        assert [s.layers for s in engine.placement.stages] == [(0, 1), (1, 2), (2, 4)]
        assert len(engine.backend.micro_batches([1] * 10)) == micro_batches
        ours = _transcript(engine)
    finally:
        engine.close()
    assert ours == references["propagate"]


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_blocks_between_exit_points_go_to_a_stage_in_one_message(tiny_models, kv_fill):
    """With one exit point (depth 1) the walk sends blocks 1-3 as one call: stage 1 gets one message
    per step for its two blocks; tokens, exit depths and K/V fills equal the single-device engine's."""
    outs = []
    for placement in ({}, {"pipeline_stages": 2}):
        engine = LLMEngine(_config(tiny_models, exit_points=(1,), kv_fill=kv_fill, **placement))
        try:
            leave = SamplingParams(max_tokens=12, exit_policy="similarity", exit_threshold=-1.0)  # always
            mixed = [leave if i % 2 else GREEDY for i in range(len(PROMPTS))]  # the others run blocks 1-3 at once
            runs = [engine.generate(PROMPTS, mixed), engine.generate(PROMPTS, GREEDY)]
            outs.append([[(o.token_ids, o.exit_layers) for o in run] for run in runs])
        finally:
            engine.close()
    assert outs[0] == outs[1]
    assert {d for o in outs[0][0] for d in o[1]} == {1, 4}


@pytest.mark.default_model
def test_default_model_split_is_token_identical(default_checkpoint, bundled_prompts):
    """The default model, 8 bundled prompts in one batch, 32 greedy tokens: ``--devices cpu,cpu`` and
    ``--pipeline-stages 2`` (one thread each) give the single-process engine's tokens; with exits
    forced at the end of stage 0 (every decode token leaves there), the same tokens and depths too."""
    prompts = [p["prompt"] for p in bundled_prompts[:8]]
    leave = SamplingParams(max_tokens=32, exit_policy="similarity", exit_threshold=-1.0)
    outs = []
    for placement in ({}, {"devices": ("cpu", "cpu")}, {"pipeline_stages": 2}):
        config = EngineConfig(model=str(default_checkpoint), num_threads=1, exit_points=(10,), **placement)
        engine = LLMEngine(config)
        try:
            if placement:
                assert engine.placement.stages[0].layers == (0, 10)  # the LM head weighs 8 layers
            runs = [engine.generate(prompts, SamplingParams(max_tokens=32)), engine.generate(prompts, leave)]
            outs.append([[(o.token_ids, o.exit_layers) for o in run] for run in runs])
        finally:
            engine.close()
    assert outs[1] == outs[0] and outs[2] == outs[0]


def test_the_command_line_reports_a_bad_stage_in_one_line(tiny_models, capsys):
    from offramp.cli.main import main

    argv = ["generate", "--model", str(tiny_models["llama"]), "--devices", "cpu,cuda:7", "--prompt", "w1"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("offramp: error: devices: stage 1: cuda:7 is not available on this host")


def test_serve_stops_when_a_stub_exits(monkeypatch):
    """``offramp serve`` returns 1 once a Python-backend stub of its server is gone."""
    import subprocess

    from offramp.serving import serve

    class Server:  # tritonserver that keeps running
        pid = os.getpid()

        def wait(self, timeout):
            raise subprocess.TimeoutExpired("tritonserver", timeout)

    assert serve.stub_pids(os.getpid()) == set()  # this test process has no stubs below it
    found = iter([{101, 102}, {101, 102}, {101}])
    monkeypatch.setattr(serve, "stub_pids", lambda root: next(found))
    monkeypatch.setattr(serve, "_is_ready", lambda http: True)
    assert serve.watch_ready(Server(), 0, period_s=0) == 1
