"""OpenAI-style API errors: every bad request becomes one of these, never a traceback."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON object OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param: str, message: str, *, code: str | None = None) -> ApiError:
    """A 400 naming the request parameter at fault."""
    return ApiError(400, message, param=param, code=code)


def busy(retry_after: int, message: str, *, status: int = 429,
         code: str | None = None) -> ApiError:
    """The queue is full (429), the model still loads or the server is stopping (503):
    come back later."""
    default = "rate_limit_exceeded" if status == 429 else "server_shutting_down"
    return ApiError(status, message, type="rate_limit_error" if status == 429 else "server_error",
                    code=code or default,
                    headers={"Retry-After": str(retry_after)})


def internal(message: str) -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")
