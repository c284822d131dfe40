"""One error type and one envelope for every failure a client can see.

OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, the type derived from the status.
Errors are raised as `ApiError` (or a subclass) and turned into a response in exactly one place
(`llmux.app`); nothing maps exceptions by matching their text.
"""

from __future__ import annotations

from typing import Any

# The `type` OpenAI uses for each status; anything else >= 500 is a server_error.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def envelope(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


class ApiError(Exception):
    """An error with the HTTP status and OpenAI fields a client should see."""

    status = 500
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param

    def to_envelope(self) -> dict[str, Any]:
        return envelope(self.status, self.message, param=self.param, code=self.code)


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401
    code = "invalid_api_key"


class ModelNotFound(ApiError):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str, *, param: str | None = "model") -> None:
        super().__init__(
            f"The model {model!r} does not exist. GET /v1/models lists the models this server has.",
            param=param,
        )


class ModelUnavailable(ApiError):
    """The model exists but cannot be served now: its load failed or it can never fit."""

    status = 503
    code = "model_unavailable"


class InternalError(ApiError):
    """An unexpected failure, told to the client without internals (the log has the details)."""

    status = 500
    code = "internal_error"

    def __init__(
        self, message: str = "Internal server error; the server log has the details."
    ) -> None:
        super().__init__(message)
