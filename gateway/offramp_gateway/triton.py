"""The Triton side: one gRPC bidirectional stream per request with ``tritonclient.grpc.aio``.

Every request opens its own ``ModelStreamInfer`` call on one shared channel, sends one request
with the vLLM-style tensors and reads responses until the one marked ``triton_final_response``.
The call carries the ``triton_grpc_error`` header, so that Triton ends it with the model's gRPC
status on an error (INVALID_ARGUMENT for bad input, UNAVAILABLE when the model's queue is full)
instead of a bare message; the status decides the HTTP status. ``TritonStream.cancel`` cancels
the call (synchronously, so it also works from a cancelled task): Triton then cancels the
request, the model sees ``is_cancelled()`` and the engine frees its KV pages.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from offramp_gateway.errors import OpenAIError

STATUS = {  # gRPC status -> HTTP status
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 400,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
CODES = {400: None, 503: "unavailable", 504: "timeout"}
TENSORS = ("text_input", "sampling_parameters")  # the gateway's own names for these are not 1:1


@dataclass(slots=True)
class Delta:
    """One Triton response: new text (the whole text when not streaming) and the counts so far."""

    text: str = ""
    exit_layers: list[int] = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    final: bool = False


def model_error(exc: grpc.aio.AioRpcError) -> OpenAIError:
    """A failed call as an OpenAI error; the model's ``sampling_parameters.<key>: ...`` names ``param``."""
    status = STATUS.get(exc.code(), 500)
    message = exc.details() or str(exc.code())
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "retry" not in message:
        message = f"Triton is unavailable ({message}); retry later"
    elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the request timed out ({message})"
    param = None
    head = message.split(":", 1)[0]
    if status == 400 and ":" in message and " " not in head and head not in TENSORS:
        param = head.removeprefix("sampling_parameters.")  # the model names the field at fault
    return OpenAIError(status, message, param, CODES.get(status, "internal_error"))


def build_inputs(text: str, sampling: dict, stream: bool) -> list[grpcclient.InferInput]:
    """The model's inputs: text, stream flag, sampling parameters (JSON), prompt left out."""
    values = {
        "text_input": ("BYTES", np.array([text.encode("utf-8")], dtype=np.object_)),
        "stream": ("BOOL", np.array([stream], dtype=bool)),
        "sampling_parameters": ("BYTES", np.array([json.dumps(sampling).encode("utf-8")], dtype=np.object_)),
        "exclude_input_in_output": ("BOOL", np.array([True], dtype=bool)),
    }
    inputs = []
    for name, (dtype, array) in values.items():
        tensor = grpcclient.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def to_delta(result) -> Delta:
    def first(name: str, default):
        array = result.as_numpy(name)
        return default if array is None or array.size == 0 else array.reshape(-1)[0]

    exits = result.as_numpy("exit_layers")
    finish = first("finish_reason", b"")
    params = result.get_response().parameters
    return Delta(
        text=first("text_output", b"").decode("utf-8"),
        exit_layers=[] if exits is None else [int(d) for d in exits.reshape(-1)],
        finish_reason=finish.decode("utf-8") if isinstance(finish, bytes) else str(finish),
        num_input_tokens=int(first("num_input_tokens", 0)),
        num_output_tokens=int(first("num_output_tokens", 0)),
        final="triton_final_response" in params and params["triton_final_response"].bool_param,
    )


class TritonStream:
    """The responses of one request; iterate for ``Delta`` objects, ``cancel`` to give up."""

    def __init__(self, client: aioclient.InferenceServerClient, model: str, inputs: list, timeout_s: float) -> None:
        self._sent = asyncio.Event()
        self._done = False
        request = {"model_name": model, "inputs": inputs}

        async def requests():
            yield request
            await self._sent.wait()  # keep our side open until the answer is complete

        self._call = client.stream_infer(requests(), stream_timeout=timeout_s, headers={"triton_grpc_error": "true"})

    def __aiter__(self) -> TritonStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            result, error = await self._call.__anext__()
        except grpc.aio.AioRpcError as exc:
            self._finish()
            raise model_error(exc) from None
        except StopAsyncIteration:
            self._finish()
            raise OpenAIError(502, "Triton closed the stream before the final response", code="bad_gateway") from None
        if error is not None:  # an error without a status (e.g. an unknown model): the request is over
            # half-close rather than cancel: Triton 2.51 (24.10) can crash (signal 11) when a gRPC
            # cancellation races the end of a request (triton-inference-server/server#8034, fixed upstream
            # by #8078); so a call is cancelled only while its request still runs (a client gone mid-stream)
            self._finish()
            raise OpenAIError(500, str(error.message() if isinstance(error, InferenceServerException) else error))
        delta = to_delta(result)
        if delta.final:
            self._finish()
        return delta

    def _finish(self) -> None:
        self._done = True
        self._sent.set()

    def cancel(self) -> None:
        """Cancel the call unless the final response came (Triton then cancels the request)."""
        if not self._done:
            self._finish()
            self._call.cancel()


class TritonBackend:
    """A ``tritonclient.grpc.aio`` client for one model; created in the server's event loop."""

    def __init__(self, url: str, model: str = "offramp", timeout_s: float = 600.0) -> None:
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self._client: aioclient.InferenceServerClient | None = None

    @property
    def client(self) -> aioclient.InferenceServerClient:
        if self._client is None:
            self._client = aioclient.InferenceServerClient(self.url)
        return self._client

    def generate(self, text: str, sampling: dict, stream: bool) -> TritonStream:
        return TritonStream(self.client, self.model, build_inputs(text, sampling, stream), self.timeout_s)

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model, client_timeout=5))
        except Exception:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
