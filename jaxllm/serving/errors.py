"""Errors as OpenAI error objects: each error type maps to exactly one HTTP status."""

from __future__ import annotations

from starlette.responses import JSONResponse

from jaxllm import errors as E


class AuthenticationError(E.JaxLLMError):
    """A missing or wrong API key."""


class BodyTooLargeError(E.JaxLLMError):
    """The request body is over the server's limit."""


class NotFoundError(E.JaxLLMError):
    """No such route or resource."""


# error type -> (HTTP status, OpenAI error type)
STATUS: dict[type, tuple[int, str]] = {
    E.InvalidRequestError: (400, "invalid_request_error"),
    E.InvalidSamplingParamsError: (400, "invalid_request_error"),
    E.ContextLengthError: (400, "invalid_request_error"),
    E.TokenizerError: (400, "invalid_request_error"),
    AuthenticationError: (401, "authentication_error"),
    E.ModelMismatchError: (404, "not_found_error"),
    NotFoundError: (404, "not_found_error"),
    BodyTooLargeError: (413, "invalid_request_error"),
    E.QueueFullError: (429, "rate_limit_error"),
    E.EngineShutdownError: (503, "service_unavailable"),
    E.DistributedError: (503, "service_unavailable"),
}

CODES = {
    E.ContextLengthError: "context_length_exceeded",
    E.ModelMismatchError: "model_not_found",
    E.QueueFullError: "queue_full",
    AuthenticationError: "invalid_api_key",
}


def error_body(message: str, err_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def status_of(exc: Exception) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "server_error"


def error_response(exc: Exception) -> JSONResponse:
    """The JSON error response for any exception (unexpected ones become a 500 without internals)."""
    status, err_type = status_of(exc)
    if status == 500:
        return JSONResponse(error_body("internal server error", err_type), status_code=500)
    return JSONResponse(
        error_body(str(exc), err_type, getattr(exc, "param", None), CODES.get(type(exc))), status_code=status
    )
