"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a status.

400 bad input, 404 unknown route, 503 when Triton is unavailable (the model's queue is full or
the server is down), 504 on a timeout, 500 for anything else.
"""

from __future__ import annotations

TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """An error answered to the client; ``param`` names the request field at fault, if one is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return TYPES.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400: the request is wrong, the message says how."""
    return OpenAIError(400, message, param, code)
