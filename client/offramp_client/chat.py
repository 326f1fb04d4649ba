"""``ChatSession``: one conversation with an ``offramp_chat`` model (Triton's sequence batcher).

Every turn goes over one gRPC stream with the same ``sequence_id``: the first sets
``sequence_start``, ``close`` sends ``sequence_end`` (a turn with an empty message, which only
closes the conversation and frees its KV pages on the server). Each turn sends only the user's new
message; the server keeps the history and answers with the reply alone.
"""

from __future__ import annotations

import queue
import secrets
import uuid
from collections.abc import Iterator

import numpy as np

from offramp_client.client import Chunk, OfframpClient, OfframpError, Result, _params_json


class ChatSession:
    def __init__(
        self, url: str, model: str = "offramp_chat", sequence_id: int | str | None = None, timeout: float = 600.0
    ) -> None:
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.timeout = url, model, timeout
        # An integer id: string ids crash tritonserver 2.51 on a sequence's second request
        # (segfault in TRITONSERVER_InferenceRequestDelete; integer ids are fine).
        self.sequence_id = sequence_id if sequence_id is not None else secrets.randbelow(2**63 - 1) + 1
        self.history: list[tuple[str, str]] = []  # (user, assistant) per successful turn
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url)
        self._results: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: self._results.put((result, error)))
        self._started = False  # START sent
        self._ended = False  # END sent
        self._closed = False  # stream closed

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(
        self, message: str, stream: bool = True, end: bool = False, _timeout: float | None = None, **params
    ) -> Iterator[Chunk]:
        """The reply to ``message``, chunk by chunk as it is generated (one chunk without
        ``stream``). ``end`` closes the conversation after this turn."""
        if self._ended or self._closed:
            raise OfframpError("the chat session is closed")
        if not message.strip() and not end:
            raise OfframpError("message: is empty")
        self._send(message, stream, end, params)
        pieces = []
        while True:
            try:
                result, error = self._results.get(timeout=_timeout or self.timeout)
            except queue.Empty:
                raise OfframpError(f"no response from the server within {_timeout or self.timeout:g} s") from None
            if error is not None:
                raise OfframpError(str(error))
            response = result.get_response()
            if response.outputs:
                chunk = OfframpClient._chunk_from_grpc(result)
                cached = result.as_numpy("num_cached_tokens")
                chunk.num_cached_tokens = 0 if cached is None else int(cached[0])
                pieces.append(chunk.text)
                yield chunk
            if response.parameters["triton_final_response"].bool_param:
                break
        if message.strip():
            self.history.append((message, "".join(pieces)))

    def ask(self, message: str, end: bool = False, **params) -> Result:
        """The whole reply (streamed from the server, merged here)."""
        chunks = list(self.send(message, True, end, **params))
        result = OfframpClient._merge(chunks)
        result.num_cached_tokens = chunks[-1].num_cached_tokens
        return result

    def close(self) -> None:
        """Send END (the server frees the conversation) and close the stream."""
        if self._closed:
            return
        try:
            if self._started and not self._ended:
                for _ in self.send("", end=True, _timeout=10.0):
                    pass
        except OfframpError:
            pass  # the server is gone or already forgot the conversation
        finally:
            self._closed = True
            self._client.stop_stream()
            self._client.close()

    def _send(self, message: str, stream: bool, end: bool, params: dict) -> None:
        def tensor(name, value, dtype):
            t = self._grpc.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else np.bool_))
            return t

        inputs = [
            tensor("text_input", message.encode("utf-8"), "BYTES"),
            tensor("stream", stream, "BOOL"),
            tensor("sampling_parameters", _params_json(params).encode("utf-8"), "BYTES"),
        ]
        from tritonclient.utils import InferenceServerException

        try:
            self._client.async_stream_infer(
                self.model,
                inputs,
                request_id=uuid.uuid4().hex,
                sequence_id=self.sequence_id,
                sequence_start=not self._started,
                sequence_end=end,
                enable_empty_final_response=True,
            )
        except InferenceServerException as exc:
            raise OfframpError(str(exc)) from None
        self._started = True
        self._ended = end
