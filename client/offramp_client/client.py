"""``OfframpClient``: generate, stream and cancel against an Offramp model in Triton; ``chat`` for
multi-turn conversations with ``offramp_chat`` (see ``offramp_client.chat``).

HTTP uses Triton's ``/generate`` and ``/generate_stream`` endpoints (plain JSON and server-sent
events); gRPC uses ``tritonclient``'s bidirectional stream, which the decoupled model needs, and
cancels by closing the stream. Both give the same ``Chunk`` / ``Result`` objects.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Chunk:
    """One streamed response: new text and the depth each of its tokens left at."""

    text: str
    exit_layers: list[int] = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # chat: prompt tokens the server did not prefill again


@dataclass(slots=True)
class Result:
    text: str
    finish_reason: str
    exit_layers: list[int]
    num_input_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0


class OfframpError(RuntimeError):
    """The server refused or failed a request (message as the server gave it)."""


def _params_json(params: dict) -> str:
    return json.dumps({k: v for k, v in params.items() if v is not None})


class OfframpClient:
    def __init__(self, url: str = "localhost:8000", protocol: str = "http", model: str = "offramp") -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol: {protocol!r} is not http or grpc")
        self.url, self.protocol, self.model = url, protocol, model
        self._grpc = None

    # -- public ---------------------------------------------------------------------------------
    def generate(self, prompt: str, **params) -> Result:
        """The whole completion in one response (``exclude_input_in_output`` is set)."""
        chunks = list(self.stream(prompt, _stream=False, **params))
        return self._merge(chunks)

    def stream(self, prompt: str, _stream: bool = True, **params) -> Iterator[Chunk]:
        """Chunks as tokens are generated. Closing the iterator early cancels the request."""
        if self.protocol == "http":
            yield from self._http(prompt, _stream, params)
        else:
            yield from self._grpc_stream(prompt, _stream, params)

    def chat(self, sequence_id: int | str | None = None, model: str | None = None):
        """A multi-turn ``ChatSession`` with an ``offramp_chat`` model (gRPC only: Triton carries
        sequence ids on gRPC streams). Close it (or use ``with``) to end the conversation."""
        from offramp_client.chat import ChatSession

        if self.protocol != "grpc":
            raise ValueError("chat: needs protocol 'grpc' (Triton's HTTP generate endpoints drop sequence ids)")
        name = model or (self.model if self.model != "offramp" else "offramp_chat")
        return ChatSession(self.url, name, sequence_id)

    def is_ready(self) -> bool:
        if self.protocol == "grpc":
            import tritonclient.grpc as grpcclient
            from tritonclient.utils import InferenceServerException

            try:
                return grpcclient.InferenceServerClient(self.url).is_model_ready(self.model)
            except InferenceServerException:
                return False
        try:
            with urllib.request.urlopen(f"http://{self._http_url()}/v2/models/{self.model}/ready", timeout=3) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    # -- HTTP -----------------------------------------------------------------------------------
    def _http_url(self) -> str:
        return self.url.removeprefix("http://")

    def _http(self, prompt: str, stream: bool, params: dict) -> Iterator[Chunk]:
        body = {
            "text_input": prompt,
            "stream": stream,
            "exclude_input_in_output": True,
            "sampling_parameters": _params_json(params),
        }
        endpoint = "generate_stream" if stream else "generate"
        req = urllib.request.Request(
            f"http://{self._http_url()}/v2/models/{self.model}/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                if not stream:
                    yield self._chunk_from_json(json.loads(resp.read()))
                    return
                for raw in resp:
                    line = raw.decode("utf-8").strip()
                    if line.startswith("data:"):
                        data = json.loads(line[5:])
                        if "error" in data:
                            raise OfframpError(data["error"])
                        yield self._chunk_from_json(data)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise OfframpError(json.loads(detail).get("error", detail) if detail.startswith("{") else detail) from None

    @staticmethod
    def _chunk_from_json(data: dict) -> Chunk:
        def one(name, default):
            value = data.get(name, default)
            return value[0] if isinstance(value, list) and value else value

        layers = data.get("exit_layers", [])
        return Chunk(
            text=one("text_output", ""),
            exit_layers=list(layers) if isinstance(layers, list) else [layers],
            finish_reason=one("finish_reason", "") or "",
            num_input_tokens=int(one("num_input_tokens", 0) or 0),
            num_output_tokens=int(one("num_output_tokens", 0) or 0),
        )

    # -- gRPC -----------------------------------------------------------------------------------
    def _grpc_stream(self, prompt: str, stream: bool, params: dict) -> Iterator[Chunk]:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        finished = False
        try:
            client.async_stream_infer(
                self.model,
                self._grpc_inputs(grpcclient, prompt, stream, params),
                request_id=uuid.uuid4().hex,
                enable_empty_final_response=True,
            )
            while not finished:
                result, error = results.get()
                if error is not None:
                    raise OfframpError(str(error))
                response = result.get_response()
                finished = response.parameters["triton_final_response"].bool_param
                if response.outputs:
                    yield self._chunk_from_grpc(result)
        finally:
            client.stop_stream(cancel_requests=not finished)
            client.close()

    @staticmethod
    def _grpc_inputs(grpcclient, prompt: str, stream: bool, params: dict) -> list:
        def tensor(name, value, dtype):
            t = grpcclient.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else np.bool_))
            return t

        return [
            tensor("text_input", prompt.encode("utf-8"), "BYTES"),
            tensor("stream", stream, "BOOL"),
            tensor("sampling_parameters", _params_json(params).encode("utf-8"), "BYTES"),
            tensor("exclude_input_in_output", True, "BOOL"),
        ]

    @staticmethod
    def _chunk_from_grpc(result) -> Chunk:
        def text(name):
            value = result.as_numpy(name)
            return value[0].decode("utf-8") if value is not None and value.size else ""

        layers = result.as_numpy("exit_layers")
        return Chunk(
            text=text("text_output"),
            exit_layers=[] if layers is None else [int(x) for x in layers],
            finish_reason=text("finish_reason"),
            num_input_tokens=int(result.as_numpy("num_input_tokens")[0]),
            num_output_tokens=int(result.as_numpy("num_output_tokens")[0]),
        )

    @staticmethod
    def _merge(chunks: list[Chunk]) -> Result:
        if not chunks:
            raise OfframpError("the server sent no response")
        last = chunks[-1]
        return Result(
            text="".join(c.text for c in chunks),
            finish_reason=last.finish_reason,
            exit_layers=[d for c in chunks for d in c.exit_layers],
            num_input_tokens=last.num_input_tokens,
            num_output_tokens=last.num_output_tokens,
        )
