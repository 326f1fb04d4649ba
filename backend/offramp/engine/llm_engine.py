"""The engine loop: the scheduler picks, the runner runs, the scheduler post-processes."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field

import torch

from offramp.blocks.factory import build_backend, kv_layout
from offramp.config import EngineConfig
from offramp.engine.detokenizer import IncrementalDetokenizer, first_stop
from offramp.engine.drafts import Speculator
from offramp.engine.exported_blocks import prepare_export
from offramp.engine.kv_sessions import CacheStats, KVSessionTable
from offramp.engine.page_manager import PageManager
from offramp.engine.runner import ModelRunner
from offramp.engine.sampling import SamplingParams
from offramp.engine.scheduler import Scheduler
from offramp.engine.sequence import FinishReason, Sequence
from offramp.model import fused
from offramp.model.device import resolve_device, to_device
from offramp.model.kv_store import KVStore, pages_for_budget
from offramp.model.loader import (
    eos_token_ids,
    load_tokenizer,
    load_weights,
    resolve_model,
    source_gguf,
)
from offramp.pipeline.build import build_pipeline
from offramp.pipeline.transport import StageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class RequestOutput:
    """A finished (or aborted) request as callers see it."""

    request_id: str
    prompt: str | None
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    exit_layers: list[int]
    num_preemptions: int = 0
    session_id: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from session pages or shared prefix pages
    ttft_s: float | None = None
    latency_s: float | None = None
    extra: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.checkpoint = resolve_model(config.model)
        self.dtype = DTYPES[config.dtype]
        self.device = resolve_device(config.devices[0] if config.devices else config.device)
        if config.backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError(f"device: the onnxruntime backend runs on cpu here, not {self.device}")
        print(f"offramp: device {self.device}, dtype {config.dtype}, backend {config.backend}", file=sys.stderr)
        if (
            config.weights == "int4"
            and self.device.type == "cuda"
            and torch.cuda.get_device_capability(self.device) < (8, 0)
        ):
            raise ValueError(f"weights: int4 on CUDA needs compute capability 8.0 or newer ({self.device} has less)")
        gguf = source_gguf(config.model)  # int4: its 4-bit blocks are used as stored
        weights, self.hf_config = load_weights(
            self.checkpoint, self.dtype, config.weights, config.weight_group_size, gguf
        )
        self.weights = to_device(weights, self.device)
        fused.prepare_products(self.weights, config, self.device)  # int8/int4 kernels, int16 activations
        self.tokenizer = load_tokenizer(self.checkpoint)
        self.eos_ids = eos_token_ids(self.checkpoint, self.tokenizer)
        shape = self.weights.shape
        self.num_layers = shape.num_layers
        self.max_model_len = self._max_model_len()
        self.block_ranges = config.block_ranges(shape.num_layers)
        self.placement = None
        if config.is_placed:  # blocks and their K/V split over devices or pipeline stages
            pipeline = build_pipeline(config, self.weights, self.block_ranges, self.device)
            self.placement, self.weights, self.kv = pipeline.placement, pipeline.weights, pipeline.kv
            self.backend, num_pages = pipeline.backend, pipeline.num_pages
        else:
            num_pages = self._build_blocks()
        try:
            self._build_loop(num_pages)
        except BaseException:
            self.backend.close()  # stage processes must not outlive a failed start
            raise

    def _build_loop(self, num_pages: int) -> None:
        """Pages, runner, sessions, scheduler and the lossless mode's drafts over the built blocks."""
        config, shape = self.config, self.weights.shape
        self.pages = PageManager(num_pages, config.page_size)
        self.runner = ModelRunner(self.weights, self.backend, self.pages, config, self.max_model_len)
        self.sessions = KVSessionTable(self.pages, config.max_sessions, config.session_idle_timeout_s)
        self.scheduler = Scheduler(
            self.pages, config.max_num_seqs, config.max_num_batched_tokens, self.sessions, config.enable_prefix_sharing
        )
        if config.exit_policy != "none" or config.exit_gate is not None:
            self.runner.policy(config.exit_policy if config.exit_policy != "none" else "softmax")  # fail at load
        self.spec = Speculator(  # lossless mode's drafts (a source that cannot run fails at load)
            config, self.runner.loop, self.runner.head, self.pages, shape, self.block_ranges, self.max_model_len
        )
        self._generators: dict[int, torch.Generator] = {}
        self._seed_counter = itertools.count(config.seed)
        self._seqs: dict[str, Sequence] = {}

    def _build_blocks(self) -> int:
        """The KV store and block backend on one device; returns the number of pages."""
        config, shape = self.config, self.weights.shape
        num_pages = config.num_pages or pages_for_budget(shape, self.dtype, config.page_size, self._kv_budget_bytes())
        export_dir = None
        if config.backend != "torch":  # exported graphs: export (or reuse) first, build TensorRT engines
            limits = (self.max_model_len, num_pages * config.page_size, shape.num_kv_heads)
            export_dir = prepare_export(config, self.checkpoint, self.block_ranges, *limits)
        kv_device, head_major = kv_layout(config, self.device)
        graphs = config.cuda_graphs and config.backend == "torch" and self.device.type == "cuda"
        devices = [kv_device] * shape.num_layers
        self.kv = KVStore(shape, num_pages, config.page_size, self.dtype, devices, head_major, scratch_page=graphs)
        self.backend = build_backend(config, self.weights, self.kv, self.block_ranges, export_dir)
        return num_pages

    @property
    def failure(self) -> str | None:
        """Why the engine cannot run any more (a pipeline stage died or hung), or None."""
        return self.backend.failure

    def close(self) -> None:
        """Stop what the engine runs outside this process (pipeline stages); idempotent."""
        self.backend.close()

    def _kv_budget_bytes(self) -> int:
        """``kv_budget_bytes``, or on a GPU with ``kv_budget_fraction`` that share of its free memory."""
        fraction = self.config.kv_budget_fraction
        if fraction is None or self.device.type != "cuda":
            return self.config.kv_budget_bytes
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * fraction)

    def _max_model_len(self) -> int:
        limit = self.weights.shape.max_position_embeddings
        window = getattr(self.hf_config, "sliding_window", None)
        if window and getattr(self.hf_config, "use_sliding_window", True):
            limit = min(limit, window)  # beyond the window the model would attend differently
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise ValueError(f"max_model_len: {self.config.max_model_len} exceeds the model's {limit}")
            limit = self.config.max_model_len
        return limit

    # -- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids of ``prompt``: through the chat template when the tokenizer has one."""
        chat = self.config.use_chat_template if chat is None else chat
        if chat and getattr(self.tokenizer, "chat_template", None):
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_for_serving(self, prompt: str) -> list[int]:
        """Served text: through the chat template unless it already carries the template's markup
        (as text from an OpenAI-compatible frontend that applied the template itself does)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not self.config.use_chat_template or not template:
            return self.encode(prompt, chat=False)
        specials = [t for t in self.tokenizer.all_special_tokens if t and t in template]
        already = any(prompt.lstrip().startswith(t) for t in specials)
        return self.encode(prompt, chat=not already)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        session_id: str | None = None,
        detokenize: bool = False,
    ) -> Sequence:
        """Queue a request; raises ``ValueError`` for input the engine cannot serve.

        Its text is decoded as it grows (``seq.detokenizer``) when it has stop strings or when
        ``detokenize`` asks for it (streaming servers).

        With ``session_id`` the request is a turn of a stateful session: ``prompt_token_ids`` are the
        FULL conversation so far (the caller renders every message, e.g. through the chat template),
        the engine reuses the K/V of the longest prefix it still holds for the session and prefills
        only the rest, and when the request finishes (for any reason but ``end_session``) the
        session keeps the pages of its computed tokens for the next turn. One request per session
        may be in flight (a second raises ``ValueError``). Outputs equal the stateless ones (greedy,
        exits off); with early exits and ``kv_fill=propagate`` the reused K/V of generated tokens is
        the propagated approximation, the same the request itself decoded with; with
        ``kv_fill=recompute`` only tokens with exact K/V are kept.
        """
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError(f"session_id: must be a non-empty string, got {session_id!r}")
        if request_id in self._seqs:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        if not prompt_token_ids:
            raise ValueError("prompt: is empty")
        if params.max_tokens > self.config.max_tokens_limit:
            raise ValueError(f"max_tokens: {params.max_tokens} exceeds the limit {self.config.max_tokens_limit}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt_token_ids)} tokens leave no room in the context of {self.max_model_len}"
            )
        if (
            self.pages.pages_for(min(len(prompt_token_ids) + params.max_tokens, self.max_model_len))
            > self.pages.num_pages
        ):
            raise ValueError(
                f"prompt: {len(prompt_token_ids)} tokens + max_tokens {params.max_tokens} exceed the KV store "
                f"({self.pages.num_pages * self.pages.page_size} tokens)"
            )
        if params.exit_policy not in (None, "none"):
            self.runner.policy(params.exit_policy)  # a policy that cannot run is refused here (ValueError)
        if params.sparsity is not None and params.sparsity < 1 and self.runner.sparse is None:
            raise ValueError("sparsity: this engine has no sparsity predictor (--sparsity-predictor)")
        lossless, spec = self.spec.new_request(params, len(prompt_token_ids))  # raises if its drafts cannot run
        if session_id is not None:
            self.sessions.open(session_id, request_id)  # last check: raises if the session is busy
        seq = Sequence(list(prompt_token_ids), params, request_id=request_id, session_id=session_id)
        seq.lossless, seq.spec = lossless, spec
        if params.stop or detokenize:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else next(self._seed_counter)
            self._generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seed)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request: it finishes with reason ``abort`` and its pages are freed at once."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.ABORT)
        return seq

    # -- sessions -------------------------------------------------------------------------------
    def end_session(self, session_id: str) -> bool:
        """Close a session: its request in flight (if any) is aborted and every page it holds is
        freed. Returns whether the session existed."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        if session.request_id is not None and session.request_id in self._seqs:
            self._finish(self._seqs[session.request_id], FinishReason.ABORT)
        self.sessions.end(session_id)
        return True

    def evict_session(self, session_id: str) -> int:
        """Drop an idle session's pages now (its next request re-prefills); returns pages freed."""
        session = self.sessions.get(session_id)
        return 0 if session is None or session.request_id is not None else self.sessions.evict(session_id)

    def expire_sessions(self) -> list[str]:
        """Close sessions idle longer than ``session_idle_timeout_s`` (cheap; ``step`` calls it)."""
        return self.sessions.expire()

    @property
    def cache_stats(self) -> CacheStats:
        """Sessions and prefix sharing now (see ``CacheStats``), for metrics."""
        return self.sessions.stats(self.scheduler.num_prefix_reused_tokens)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> tuple[list[Sequence], list[Sequence]]:
        """One iteration: the scheduler picks, the runner runs, the scheduler appends each token with
        its exit depth, and finished sequences are retired. Returns (sequences that got a token,
        sequences that finished)."""
        if self.backend.failure is not None:  # a pipeline stage died or hung: nothing can run
            raise StageError(self.backend.failure)
        self.sessions.expire()
        self.spec.plan(self.scheduler.running)
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return [], []
        self.spec.propose(batch)  # lossless mode: drafts into the scheduled slots
        output = self.runner.run(batch, self._generators)
        for item, tokens, depths in zip(batch.scheduled, output.token_ids, output.exit_layers):
            kept = self._num_kept(item.seq, tokens)  # accepted drafts end at a stop, as plain decoding would
            del tokens[kept:], depths[kept:]
        grown = self.scheduler.postprocess(batch, output.token_ids, output.exit_layers, output.num_accepted)
        self.spec.record(batch, output.num_accepted)
        finished = [seq for seq in grown if self._finish_if_done(seq)]
        return grown, finished

    def _num_kept(self, seq: Sequence, tokens: list[int]) -> int:
        """How many of a step's new tokens the sequence keeps: all, or (several accepted at once) up to
        the first that ends it (EOS, a stop string, max_tokens, the context), as plain decoding would."""
        if len(tokens) <= 1:
            return len(tokens)
        n = min(len(tokens), seq.params.max_tokens - len(seq.output_token_ids), self.max_model_len - seq.num_tokens)
        if not seq.params.ignore_eos:
            n = next((i + 1 for i, t in enumerate(tokens[:n]) if t in self.eos_ids), n)
        detok = seq.detokenizer
        if detok is not None and detok.stop and detok.stop_at is None:
            detok.add(seq.output_token_ids[len(detok.token_ids) :])
            for i in range(n):  # one at a time: the stop string may end inside the accepted tokens
                detok.add(tokens[i : i + 1])
                if detok.stop_at is not None:
                    return i + 1
        return n

    def _finish_if_done(self, seq: Sequence) -> bool:
        reason = self._stop_reason(seq)
        if reason is not None:
            self._finish(seq, reason)
        return reason is not None

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        if seq.detokenizer is not None:  # incremental: only the new tokens are decoded
            seq.detokenizer.add(seq.output_token_ids[len(seq.detokenizer.token_ids) :])
        if seq.output_token_ids[-1] in self.eos_ids and not seq.params.ignore_eos:
            return FinishReason.STOP
        if seq.detokenizer is not None and seq.detokenizer.stop_at is not None:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        if seq.session_id is not None:  # the session keeps the pages of the tokens with exact K/V
            exact = self.runner.exact_prefix(seq.seq_id, seq.num_computed_tokens)
            self.sessions.detach(seq.session_id, seq.seq_id, seq.token_ids(0, exact))
        self.scheduler.finish(seq, reason)
        self.runner.release(seq.seq_id)
        seq.finish_time = time.perf_counter()
        self._generators.pop(seq.seq_id, None)
        self._seqs.pop(seq.request_id, None)

    def output_of(self, seq: Sequence, prompt: str | None = None) -> RequestOutput:
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        cut = first_stop(text, seq.params.stop) if seq.params.stop else None
        text = text if cut is None else text[:cut]
        end = seq.finish_time or time.perf_counter()
        return RequestOutput(
            request_id=seq.request_id,
            prompt=prompt,
            text=text,
            token_ids=list(seq.output_token_ids),
            prompt_token_ids=list(seq.prompt_token_ids),
            finish_reason=(seq.finish_reason or FinishReason.ABORT).value,
            exit_layers=list(seq.exit_layers),
            num_preemptions=seq.num_preemptions,
            session_id=seq.session_id,
            num_cached_tokens=seq.num_cached_tokens,
            ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
            latency_s=end - seq.arrival_time,
        )

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
        chat: bool | None = None,
    ) -> list[RequestOutput]:
        """Offline: run all prompts together (continuously batched) and return them in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            ids = prompt if isinstance(prompt, list) else self.encode(prompt, chat)
            seqs.append(self.add_request(f"offline-{id(seqs)}-{i}", ids, p))
        while self.has_work:
            self.step()
        return [self.output_of(seq, prompt if isinstance(prompt, str) else None) for seq, prompt in zip(seqs, prompts)]
