"""What the Triton models (``offramp`` and ``offramp_chat``) share: engine start and stop, request
inputs, the response thread, error codes and Prometheus metrics.

Triton's ``triton_python_backend_utils`` module is passed in (``pb``) by each ``model.py``: this
package never imports it, so everything else stays testable without a server.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from offramp.engine.llm_engine import LLMEngine
from offramp.serving.async_engine import AsyncEngine
from offramp.serving.events import EngineStats, StreamEvent
from offramp.serving.requests import GenerateRequest, RequestError, parse_request
from offramp.serving.serving_config import load_serving_config

INPUTS = ("text_input", "stream", "sampling_parameters", "exclude_input_in_output")
OVERRIDES_ENV = "OFFRAMP_ENGINE_OVERRIDES"  # set by ``offramp serve``; applies to every model it loads


class Metrics:
    """Offramp's Prometheus metrics on Triton's metrics port, one label set per model. Both models
    create the same families (same name, kind and help text), which Triton shares between them."""

    def __init__(self, pb, model: str, num_layers: int) -> None:
        labels = {"model": model}
        fam = pb.MetricFamily
        self._families = []  # a family must outlive its metrics

        def metric(name, help_text, kind, buckets=None):
            family = fam(name=name, description=help_text, kind=kind)
            self._families.append(family)
            return family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)

        self.tokens = metric("offramp_generated_tokens_total", "Generated tokens", fam.COUNTER)
        self.preemptions = metric("offramp_preemptions_total", "Sequences preempted (recomputed later)", fam.COUNTER)
        self.exit_depth = metric(
            "offramp_exit_layer",
            "Layers each generated token ran before leaving",
            fam.HISTOGRAM,
            [float(d) for d in range(1, num_layers + 1)],
        )
        self.batch = metric(
            "offramp_batch_size",
            "Sequences that got a token per engine iteration",
            fam.HISTOGRAM,
            [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        )
        seconds = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
        self.ttft = metric("offramp_time_to_first_token_seconds", "Time to first token", fam.HISTOGRAM, seconds)
        self.tpot = metric("offramp_time_per_output_token_seconds", "Time per output token", fam.HISTOGRAM, seconds)
        self.running = metric("offramp_running_sequences", "Sequences being generated", fam.GAUGE)
        self.waiting = metric("offramp_waiting_sequences", "Sequences waiting for admission", fam.GAUGE)
        self.pages_used = metric("offramp_kv_pages_used", "KV pages in use", fam.GAUGE)
        self.pages_free = metric("offramp_kv_pages_free", "KV pages free", fam.GAUGE)
        self.sessions = metric("offramp_sessions", "Sessions held by the engine (idle or in a turn)", fam.GAUGE)
        self.session_pages = metric("offramp_session_kv_pages", "KV pages sessions keep between turns", fam.GAUGE)
        self.session_evictions = metric(
            "offramp_session_evictions_total", "Idle sessions whose KV pages were dropped for memory", fam.COUNTER
        )
        self.shared_pages = metric(
            "offramp_prefix_shared_kv_pages", "KV pages held by more than one sequence or session", fam.GAUGE
        )
        self.spec_drafts = metric(
            "offramp_spec_draft_tokens_total", "Draft tokens verified by the full model (lossless mode)", fam.COUNTER
        )
        self.spec_accepted = metric(
            "offramp_spec_accepted_tokens_total", "Draft tokens the full model accepted (lossless mode)", fam.COUNTER
        )
        self.sparsity_density = metric(
            "offramp_sparsity_mean_density",
            "Mean share of FFN neuron groups computed by sparse decode tokens (contextual sparsity; 1 = dense)",
            fam.GAUGE,
        )
        self._preemptions = 0
        self._evictions = 0
        self._spec_counts = (0, 0)  # cumulative (drafts, accepted) already counted

    def update(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.pages_used.set(s.pages_used)
        self.pages_free.set(s.pages_free)
        self.sessions.set(s.num_sessions)
        self.session_pages.set(s.session_pages)
        self.shared_pages.set(s.prefix_shared_pages)
        if s.sparsity_density is not None:
            self.sparsity_density.set(s.sparsity_density)
        if s.num_preemptions > self._preemptions:
            self.preemptions.increment(s.num_preemptions - self._preemptions)
            self._preemptions = s.num_preemptions
        if s.session_evictions > self._evictions:
            self.session_evictions.increment(s.session_evictions - self._evictions)
            self._evictions = s.session_evictions
        if s.new_tokens:
            self.tokens.increment(s.new_tokens)
            self.batch.observe(float(s.batch_size))
        for depth in s.exit_layers:
            self.exit_depth.observe(float(depth))
        for t in s.ttft_s:
            self.ttft.observe(t)
        for t in s.tpot_s:
            self.tpot.observe(t)

    def update_spec(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """The engine's cumulative draft and accepted token counts (lossless mode)."""
        drafts, accepted = self._spec_counts
        if num_draft_tokens > drafts:
            self.spec_drafts.increment(num_draft_tokens - drafts)
        if num_accepted_tokens > accepted:
            self.spec_accepted.increment(num_accepted_tokens - accepted)
        self._spec_counts = (max(drafts, num_draft_tokens), max(accepted, num_accepted_tokens))


def instance_device(args: dict, device: str | None) -> str | None:
    """A ``KIND_GPU`` instance runs on the GPU Triton gave it (``cuda:<model_instance_device_id>``)
    unless ``engine.json`` names a device of its own; other instances keep ``device``."""
    if device in (None, "cuda") and args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return device


def exit_with_parent(interval_s: float = 0.5) -> threading.Thread:
    """End this process (the Python-backend stub) at once when its parent, tritonserver, is gone.
    The stub's own check for that can hang when the server dies while a model is still loading,
    which left the stub orphaned with the model's memory; this one needs nothing but the GIL."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)  # reparented: the server is gone, and nothing here can be handed back to it

    thread = threading.Thread(target=watch, name="offramp-parent-watch", daemon=True)
    thread.start()
    return thread


class ModelAdapter:
    """One served model: settings from ``engine.json`` (plus ``offramp serve``'s overrides), the
    engine thread, the metrics and the thread that sends responses, for ``model.py`` to use."""

    def __init__(self, pb, args: dict, extra_outputs: tuple[str, ...] = (), watch_parent: bool = True) -> None:
        if watch_parent:
            exit_with_parent()  # first: loading the model can take long
        model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        if not pb.using_decoupled_model_transaction_policy(model_config):
            raise pb.TritonModelException(f"{self.name} needs model_transaction_policy {{ decoupled: true }}")
        self.pb = pb
        self.extra_outputs = tuple(extra_outputs)  # outputs beyond the vLLM-style five (config.pbtxt lists them)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        overrides = json.loads(os.environ.get(OVERRIDES_ENV, "{}"))
        self.config = load_serving_config(version_dir / "engine.json", overrides)
        self.config.engine.device = instance_device(args, self.config.engine.device)
        self.metrics: Metrics | None = None
        self.engine = AsyncEngine(
            lambda: LLMEngine(self.config.engine), self.config.max_queued_requests, self._on_stats, self._on_fatal
        )
        self.engine.start()  # the engine is built on its own thread (see AsyncEngine)
        metrics = Metrics(pb, self.name, self.engine.engine.num_layers)
        metrics.update(self.engine.snapshot())  # every gauge holds the engine's state from load on
        self.metrics = metrics
        self.outbox: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self._send_loop, name=f"{self.name}-responses", daemon=True)
        self.sender.start()

    def _on_stats(self, stats: EngineStats) -> None:
        if self.metrics is not None:
            self.metrics.update(stats)
            loop = self.engine.engine.runner.stats  # on the engine thread: the counts are current
            self.metrics.update_spec(loop.num_draft_tokens, loop.num_accepted_tokens)

    def _on_fatal(self, failure: str) -> None:
        """The engine cannot run any more (a pipeline stage died or hung): once the error responses
        are sent, this stub exits. Triton does not restart it (nor turn the model not ready by itself):
        ``offramp serve`` sees the stub gone, stops the server and exits with an error instead of
        serving failures."""
        self.pb.Logger.log_error(f"{self.name}: {failure}; the model stops")

        def leave() -> None:
            deadline = time.monotonic() + 10
            while not self.outbox.empty() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the last response leaves the sender
            os._exit(1)

        threading.Thread(target=leave, name=f"{self.name}-fatal", daemon=True).start()

    @property
    def tokenizer(self):
        """The served model's tokenizer (the chat model renders conversations with it)."""
        return self.engine.tokenizer

    def stop(self) -> None:
        """Drain in-flight requests (every one gets its final response), then stop both threads."""
        self.engine.shutdown()
        self.outbox.put(None)
        self.sender.join(timeout=10)

    # -- requests -------------------------------------------------------------------------------
    def input(self, request, name: str):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def parse(self, request) -> GenerateRequest:
        """The request's inputs, validated (``RequestError`` names the bad field)."""
        values = [self.input(request, name) for name in INPUTS]
        cfg = self.config
        return parse_request(*values, cfg.default_max_tokens, cfg.max_prompt_chars, cfg.engine.exit_policy)

    def emitter(self, sender) -> Callable[[StreamEvent], None]:
        """The ``emit`` callback for a request: events go to the response thread, in order."""
        return lambda event: self.outbox.put((sender, event))

    def fail(self, sender, exc: BaseException) -> None:
        """Answer a request that never reached the engine with its one final (error) response."""
        if not isinstance(exc, RequestError):
            exc = RequestError(f"internal error: {exc!r}", code="internal")
        sender.send(
            self.pb.InferenceResponse(error=self.error(exc)), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        )

    def error(self, exc: RequestError):
        pb = self.pb
        codes = {"invalid": pb.TritonError.INVALID_ARG, "unavailable": pb.TritonError.UNAVAILABLE}
        return pb.TritonError(str(exc), codes.get(exc.code, pb.TritonError.INTERNAL))

    # -- responses ------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while True:
            item = self.outbox.get()
            if item is None:
                return
            sender, event = item
            flags = final if event.finished else 0
            try:
                if event.error is not None:
                    sender.send(self.pb.InferenceResponse(error=self.error(event.error)), flags=flags)
                else:
                    sender.send(self._response(event), flags=flags)
            except Exception as exc:  # the client went away; the engine already let go of it
                self.pb.Logger.log_warn(f"{self.name}: could not send a response: {exc}")

    def _response(self, event: StreamEvent):
        outputs = {
            "text_output": np.array([event.text.encode("utf-8")], dtype=np.object_),
            "finish_reason": np.array([event.finish_reason.encode("utf-8")], dtype=np.object_),
            "num_input_tokens": np.array([event.num_input_tokens], dtype=np.int32),
            "num_output_tokens": np.array([event.num_output_tokens], dtype=np.int32),
            "exit_layers": np.array(event.exit_layers, dtype=np.int32),
        }
        if "num_cached_tokens" in self.extra_outputs:
            outputs["num_cached_tokens"] = np.array([event.num_cached_tokens], dtype=np.int32)
        tensors = [self.pb.Tensor(k, v) for k, v in outputs.items()]
        return self.pb.InferenceResponse(output_tensors=tensors)
