"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status OpenAI uses for the same case, and the mapping from the control plane's gRPC statuses."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

# A client told to retry (429) waits this long (seconds) before it does.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist: this gateway serves {served!r}.",
                    param="model", code="model_not_found")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes.",
                    code="request_too_large")


def session_busy(session_id: str) -> ApiError:
    return ApiError(409, f"Session {session_id!r} is already answering a request: a session "
                         "runs one request at a time; send the next one after the last "
                         "response has ended.", code="session_busy")


_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "control_plane_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "service_unavailable", "timeout"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.CANCELLED: (503, "service_unavailable", "cancelled"),
}


def from_grpc(code: grpc.StatusCode, message: str) -> ApiError:
    """The HTTP error for a failed control-plane call."""
    status, type_, err_code = _BY_GRPC.get(code, (500, "server_error", "internal_error"))
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    if code is grpc.StatusCode.UNAVAILABLE:
        message = f"The control plane is unavailable: {message}"
    return ApiError(status, message, type_, code=err_code, headers=headers)
