"""One exception tree, one mapping to OpenAI-shaped errors.

    GatewayError                      500 api_error
     ├── InvalidRequest               400 invalid_request_error
     │    └── ContextLengthExceeded   400 invalid_request_error / context_length_exceeded
     ├── AuthenticationFailed         401 invalid_request_error / invalid_api_key
     ├── PermissionDenied             403 permission_error
     ├── NotFound                     404 invalid_request_error (model_not_found, ...)
     ├── MethodNotAllowed             405 invalid_request_error
     ├── RequestTimeout               408 invalid_request_error (body not sent in time)
     ├── PayloadTooLarge              413 invalid_request_error
     ├── UnsupportedMediaType         415 invalid_request_error
     ├── HeadersTooLarge              431 invalid_request_error (request head over the bound)
     ├── RateLimited                  429 rate_limit_error (+ Retry-After)
     ├── Unavailable                  503 service_unavailable (+ Retry-After)
     ├── BackendError                 502 by default; a backend may choose the status
     └── ClientDisconnected           499 (logged only: nobody is left to read it)
"""

from __future__ import annotations

import json
from typing import Any


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after)))
        return headers

    def sse_event(self) -> bytes:
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class BackendError(GatewayError):
    """A backend failed. Backends pick the status their failure deserves."""

    status = 502
    type = "api_error"
    code: str | None = "backend_error"

    def __init__(self, message: str, status: int = 502, code: str | None = "backend_error", *,
                 type: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, param=param, retry_after=retry_after)
        self.code = code  # None too: an upstream's error may have no code
        if type is not None:
            self.type = type
        elif 400 <= status < 500:
            self.type = "invalid_request_error"


class ClientDisconnected(GatewayError):
    status = 499
    type = "client_closed_request"
    code = "client_disconnected"
