"""Triton Python backend adapter for Offramp (decoupled, stateless: one request, one completion).

``initialize`` reads ``engine.json`` and starts the engine thread and a response thread;
``execute`` only validates and enqueues; ``finalize`` drains in-flight requests and joins.
Everything else lives in the ``offramp`` package (``offramp.serving.triton_adapter`` for what this model
shares with ``offramp_chat``), which never imports Triton's utilities.
"""

import uuid

import triton_python_backend_utils as pb_utils

from offramp.serving.events import RequestHandle
from offramp.serving.triton_adapter import ModelAdapter


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        return auto_complete_model_config

    def initialize(self, args):
        self.adapter = ModelAdapter(pb_utils, args)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                handle = RequestHandle(
                    request_id=uuid.uuid4().hex,
                    request=self.adapter.parse(request),
                    emit=self.adapter.emitter(sender),
                    is_cancelled=sender.is_cancelled,
                )
                self.adapter.engine.submit(handle)
            except Exception as exc:  # every request gets its one final response
                self.adapter.fail(sender, exc)
        return None

    def finalize(self):
        self.adapter.stop()
