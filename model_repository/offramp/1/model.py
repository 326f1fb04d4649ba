"""Triton Python backend adapter for Offramp (decoupled).

``initialize`` reads ``engine.json`` and starts the engine thread and a response thread;
``execute`` only validates and enqueues; ``finalize`` drains in-flight requests and joins.
Everything else lives in the ``offramp`` package, which never imports Triton's utilities.
"""

import json
import os
import queue
import threading
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from offramp.async_engine import AsyncEngine, EngineStats, RequestHandle, StreamEvent
from offramp.engine import LLMEngine
from offramp.requests import RequestError, parse_request
from offramp.serving_config import load_serving_config

INPUTS = ("text_input", "stream", "sampling_parameters", "exclude_input_in_output")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Metrics:
    """Offramp's Prometheus metrics on Triton's metrics port."""

    def __init__(self, model: str, num_layers: int) -> None:
        labels = {"model": model}
        fam = pb_utils.MetricFamily
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
        self._preemptions = 0

    def update(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.pages_used.set(s.pages_used)
        self.pages_free.set(s.pages_free)
        if s.num_preemptions > self._preemptions:
            self.preemptions.increment(s.num_preemptions - self._preemptions)
            self._preemptions = s.num_preemptions
        if s.new_tokens:
            self.tokens.increment(s.new_tokens)
            self.batch.observe(float(s.batch_size))
        for depth in s.exit_layers:
            self.exit_depth.observe(float(depth))
        for t in s.ttft_s:
            self.ttft.observe(t)
        for t in s.tpot_s:
            self.tpot.observe(t)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        return auto_complete_model_config

    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("offramp needs model_transaction_policy { decoupled: true }")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        overrides = json.loads(os.environ.get("OFFRAMP_ENGINE_OVERRIDES", "{}"))
        self.config = load_serving_config(version_dir / "engine.json", overrides)
        self.metrics = None
        self.async_engine = AsyncEngine(
            lambda: LLMEngine(self.config.engine), self.config.max_queued_requests, lambda s: self.metrics.update(s)
        )
        self.async_engine.start()  # the engine is built on its own thread (see AsyncEngine)
        self.metrics = Metrics(args["model_name"], self.async_engine.engine.num_layers)
        self.outbox: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self._send_loop, name="offramp-responses", daemon=True)
        self.sender.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                values = [self._input(request, name) for name in INPUTS]
                parsed = parse_request(*values, self.config.default_max_tokens, self.config.max_prompt_chars)
                self.async_engine.submit(
                    RequestHandle(
                        request_id=uuid.uuid4().hex,
                        request=parsed,
                        emit=lambda event, s=sender: self.outbox.put((s, event)),
                        is_cancelled=sender.is_cancelled,
                    )
                )
            except RequestError as exc:
                sender.send(pb_utils.InferenceResponse(error=self._error(exc)), flags=FINAL)
            except Exception as exc:  # every request gets its one final response
                error = RequestError(f"internal error: {exc!r}", code="internal")
                sender.send(pb_utils.InferenceResponse(error=self._error(error)), flags=FINAL)
        return None

    def finalize(self):
        self.async_engine.shutdown()
        self.outbox.put(None)
        self.sender.join(timeout=10)

    @staticmethod
    def _input(request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    @staticmethod
    def _error(exc: RequestError):
        codes = {"invalid": pb_utils.TritonError.INVALID_ARG, "unavailable": pb_utils.TritonError.UNAVAILABLE}
        return pb_utils.TritonError(str(exc), codes.get(exc.code, pb_utils.TritonError.INTERNAL))

    def _send_loop(self):
        while True:
            item = self.outbox.get()
            if item is None:
                return
            sender, event = item
            flags = FINAL if event.finished else 0
            try:
                if event.error is not None:
                    sender.send(pb_utils.InferenceResponse(error=self._error(event.error)), flags=flags)
                else:
                    sender.send(self._response(event), flags=flags)
            except Exception as exc:  # the client went away; the engine already let go of it
                pb_utils.Logger.log_warn(f"offramp: could not send a response: {exc}")

    @staticmethod
    def _response(event: StreamEvent):
        outputs = {
            "text_output": np.array([event.text.encode("utf-8")], dtype=np.object_),
            "finish_reason": np.array([event.finish_reason.encode("utf-8")], dtype=np.object_),
            "num_input_tokens": np.array([event.num_input_tokens], dtype=np.int32),
            "num_output_tokens": np.array([event.num_output_tokens], dtype=np.int32),
            "exit_layers": np.array(event.exit_layers, dtype=np.int32),
        }
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
