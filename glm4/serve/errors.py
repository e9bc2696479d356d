"""Errors as OpenAI answers them: `{"error": {message, type, param, code}}` with an HTTP status.

Every failure a request can meet ends here: `APIError` raised by the handlers, pydantic's validation errors
(reworded the way OpenAI words them), unknown routes, and, as the last resort, any other exception (a 500
that names only the exception's type; the traceback goes to the log, never to the client). `GateMiddleware`
checks the API key and the body size before anything else runs.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("glm4.serve")

MAX_BODY_BYTES = 32 * 2**20


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def aborted() -> APIError:
    """The engine dropped the request (shutdown) before it finished."""
    return APIError(503, "the request was aborted by the server", "server_error", None, "aborted")


def client_gone() -> APIError:
    return APIError(499, "client disconnected", "invalid_request_error")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------------------------
# pydantic's validation errors in OpenAI's words

_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool", "function", "text", "image_url",
              # Responses input items and parts (never a field name right after an index)
              "message", "function_call_output", "reasoning", "input_text", "input_image", "input_file", "output_text"}


def _clean_loc(loc) -> list[str]:
    # pydantic adds union members ("str", "list[...]") and discriminator tags ("user") to the path
    out = []
    for x in loc:
        x = str(x)
        if x == "body" or "[" in x or x in ("str", "int", "float", "bool", "dict", "list"):
            continue
        if x in _ROLE_TAGS and out and out[-1].isdigit():
            continue
        out.append(x)
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 for the first validation error, with (message, param, code) as OpenAI gives them."""
    errs = exc.errors()
    if not errs:
        return bad_request("invalid request")
    e = errs[0]
    loc = _clean_loc(e.get("loc", ()))
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    kind = e.get("type")
    if kind == "json_invalid":
        return bad_request("the request body is not valid JSON", None, "invalid_json")
    if kind == "missing":
        return bad_request(f"missing required parameter: {param}", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {loc[-1] if loc else param}", param,
                           "unknown_parameter")
    if param is None and ":" in msg and msg.split(":", 1)[0].replace("_", "").replace(".", "").isalnum():
        return bad_request(msg, msg.split(":", 1)[0])  # our model validators name the parameter first
    return bad_request(f"{param}: {msg}" if param else msg, param)


def install_error_handlers(app: FastAPI, metrics) -> None:
    """Every exception a route can raise becomes a JSON error body; each is counted by status."""

    def answer(e: APIError) -> JSONResponse:
        metrics.inc("request_errors_total", status=str(e.status))
        return error_response(e)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return answer(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        msg = {404: f"Unknown route: {request.method} {request.url.path}",
               405: f"Method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return answer(APIError(exc.status_code, msg, "invalid_request_error", headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        return answer(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))


class GateMiddleware:
    """Bearer-token check for every route but /health, and a request-size cap (pure ASGI, so streaming
    and disconnect detection stay intact)."""

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"0")
        if size.isdigit() and int(size) > self.max_body:
            err = APIError(413, f"request body over {self.max_body} bytes", "invalid_request_error", None,
                           "request_too_large")
            return await error_response(err)(scope, receive, send)
        if not self.api_key or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get(b"api-key", b"").decode("latin-1")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode("utf-8")):
            err = APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                           "invalid_request_error", None, "invalid_api_key")
            return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)
