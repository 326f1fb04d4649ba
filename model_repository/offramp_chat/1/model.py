"""Triton Python backend adapter for Offramp chat: multi-turn conversations on Triton's sequence
batcher (decoupled). One conversation per correlation id; each turn's ``text_input`` is the user's
next message.

``execute`` only reads the sequence flags and inputs and hands the turn to ``offramp.serving.chat`` (the
per-conversation history, turn queue and session handling, no Triton there); the engine thread,
response thread and metrics are the ones the stateless ``offramp`` model uses
(``offramp.serving.triton_adapter``).
"""

import triton_python_backend_utils as pb_utils

from offramp.serving.chat import Conversations, chat_renderer, parse_turn
from offramp.serving.requests import RequestError
from offramp.serving.triton_adapter import INPUTS, ModelAdapter


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        return auto_complete_model_config

    def initialize(self, args):
        self.adapter = ModelAdapter(pb_utils, args, extra_outputs=("num_cached_tokens",))
        config = self.adapter.config
        render = chat_renderer(self.adapter.tokenizer, config.engine.use_chat_template)
        self.chats = Conversations(
            self.adapter.engine, render, config.engine.session_idle_timeout_s, config.max_queued_requests
        )

    def execute(self, requests):
        config = self.adapter.config
        for request in requests:
            sender = request.get_response_sender()
            try:
                correlation_id = request.correlation_id()
                if correlation_id in (0, "", None):  # Triton refuses these before they get here
                    raise RequestError("offramp_chat needs a sequence id (gRPC stream with sequence_id)")
                turn = parse_turn(
                    correlation_id,
                    {name: self.adapter.input(request, name) for name in INPUTS},
                    self._flag(request, "START"),
                    self._flag(request, "END"),
                    self.adapter.emitter(sender),
                    sender.is_cancelled,
                    config.default_max_tokens,
                    config.max_prompt_chars,
                )
                self.chats.submit(turn)
            except Exception as exc:  # every request gets its one final response
                self.adapter.fail(sender, exc)
        return None

    def finalize(self):
        self.chats.close()
        self.adapter.stop()

    def _flag(self, request, name):
        value = self.adapter.input(request, name)
        return bool(value is not None and value.size and value.reshape(-1)[0])
