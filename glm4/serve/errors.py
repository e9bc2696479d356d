"""Errors as OpenAI answers them: `{"error": {message, type, param, code}}` with an HTTP status.

Every failure a request can meet ends here: `APIError` raised by the handlers, pydantic's validation errors
(reworded the way OpenAI words them), unknown routes, and, as the last resort, any other exception (a 500
that names only the exception's type; the traceback goes to the log, never to the client). `GateMiddleware`
checks the API key (`Authorization: Bearer`, `x-api-key` or `api-key`) and the body size before anything else runs.

An API with its own error body (Anthropic's under /v1/messages) registers an `ErrorShape` for its path prefix:
`install_error_handlers(app, metrics, shapes)` and `GateMiddleware(app, api_key, shapes=shapes)` answer every error
on those paths in that shape, with the same status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("glm4.serve")

MAX_BODY_BYTES = 32 * 2**20  # --max-body-bytes
BODY_TIMEOUT_S = 30.0  # --body-timeout: seconds to receive a whole request body
MAX_JSON_DEPTH = 128  # nesting levels a request body may have
PARSED_JSON = "glm4.json"  # ASGI scope key: the POST body as GateMiddleware parsed it, reused by ParsedBodyRoute


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


ErrorShape = Callable[[APIError], dict]  # an APIError -> the JSON body an API answers it with


def shape_for(shapes: dict[str, ErrorShape] | None, path: str) -> ErrorShape:
    """The error shape of the API serving `path`: the registered prefix it falls under, else OpenAI's."""
    for prefix, shape in (shapes or {}).items():
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return shape
    return APIError.body


def error_response(e: APIError, shape: ErrorShape = APIError.body) -> JSONResponse:
    return JSONResponse(shape(e), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------------------------
# pydantic's validation errors in OpenAI's words

_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool", "function", "text", "image_url",
              # Anthropic's block, tool_choice and thinking tags
              "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "auto", "any", "none", "enabled",
              "disabled", "adaptive",
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


def install_error_handlers(app: FastAPI, metrics, shapes: dict[str, ErrorShape] | None = None) -> None:
    """Every exception a route can raise becomes a JSON error body (in the shape of the API its path belongs to);
    each is counted by status."""

    def answer(e: APIError, request=None) -> JSONResponse:  # counted by GateMiddleware, by the status sent
        return error_response(e, shape_for(shapes, request.url.path if request is not None else ""))

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return answer(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return answer(validation_error(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        msg = {404: f"Unknown route: {request.method} {request.url.path}",
               405: f"Method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return answer(APIError(exc.status_code, msg, "invalid_request_error", headers=getattr(exc, "headers", None)),
                      request)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        return answer(APIError(500, f"internal error: {type(exc).__name__}", "server_error"), request)


class _BodyError(Exception):
    def __init__(self, error: APIError | None):  # None: the client went away while sending
        self.error = error


def invalid_json(message: str) -> APIError:
    return bad_request(message, None, "invalid_json")


def check_json_body(body: bytes) -> tuple[bytes, object]:
    """(the body with a UTF-8 BOM removed, its parsed JSON), or a 400 `invalid_json` saying what is wrong with it
    (the same answer on every route: empty, not UTF-8, not JSON, nested deeper than MAX_JSON_DEPTH)."""
    body = body.removeprefix(b"\xef\xbb\xbf")
    if not body.strip():
        raise invalid_json("request body is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid_json(f"request body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}") from None
    too_deep = invalid_json(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid_json(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise too_deep from None
    if _depth_over(obj, MAX_JSON_DEPTH):
        raise too_deep
    return body, obj


def _depth_over(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return True
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


class GateMiddleware:
    """What every request passes before a route sees it (pure ASGI, so streaming and disconnect detection stay
    intact): the API key for every route but /health and the `public` ones (`Authorization: Bearer <key>`, `x-api-key` as Anthropic's
    clients send it, or `api-key`); a body read whole within `body_timeout` seconds (408, connection closed: a
    half-sent body never holds a socket) and at most `max_body` bytes (413); a POST body checked as JSON
    (`check_json_body`). Errors come in the shape of the API the path belongs to. With `metrics`, each request is
    counted once by the status it ended with (`responses_total{status}`, errors also in
    `request_errors_total{status}`), 499 when the client went away before its response was complete."""

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY_BYTES,
                 shapes: dict[str, ErrorShape] | None = None, body_timeout: float = BODY_TIMEOUT_S, metrics=None,
                 public: Callable[[str], bool] | None = None):
        self.app, self.api_key, self.max_body, self.shapes = app, api_key, max_body, shapes
        self.body_timeout, self.metrics = body_timeout, metrics
        self.public = public or (lambda path: False)  # paths served without a key, besides /health

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"status": None, "complete": False, "gone": False}

        async def watched_send(msg):
            if msg["type"] == "http.response.start":
                seen["status"] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body"):
                seen["complete"] = True
            await send(msg)

        async def watched_receive():
            msg = await receive()
            if msg["type"] == "http.disconnect" and not seen["complete"]:
                seen["gone"] = True
            return msg

        try:
            await self._gate(scope, watched_receive, watched_send)
        finally:
            if self.metrics is not None:
                status = 499 if seen["gone"] or seen["status"] is None else seen["status"]
                self.metrics.inc("responses_total", status=str(status))
                if status >= 400:
                    self.metrics.inc("request_errors_total", status=str(status))

    async def _gate(self, scope, receive, send):
        shape = shape_for(self.shapes, scope.get("path", ""))
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"0")
        if size.isdigit() and int(size) > self.max_body:
            return await self._refuse(self._too_large(), shape, scope, receive, send)
        if (self.api_key and scope.get("path") != "/health" and not self.public(scope.get("path", ""))
                and not self._key_ok(headers)):
            err = APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>' or "
                           "'x-api-key: <key>'.", "invalid_request_error", None, "invalid_api_key")
            return await error_response(err, shape)(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(receive)
            if scope.get("method") == "POST":
                body, scope[PARSED_JSON] = (await _off_loop(check_json_body, body) if len(body) > 2**16
                                            else check_json_body(body))
        except _BodyError as e:
            if e.error is None:
                return None  # nobody to answer
            return await self._refuse(e.error, shape, scope, receive, send)
        except APIError as e:
            return await error_response(e, shape)(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)

    def _key_ok(self, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        else:
            token = (headers.get(b"x-api-key") or headers.get(b"api-key") or b"").decode("latin-1")
        return hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode("utf-8"))

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over {self.max_body} bytes", "invalid_request_error", None,
                        "request_too_large")

    async def _read_body(self, receive) -> bytes:
        """The whole body within body_timeout seconds and max_body bytes, else a _BodyError."""
        parts, n = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise _BodyError(None)
                    chunk = msg.get("body", b"")
                    n += len(chunk)
                    if n > self.max_body:
                        raise _BodyError(self._too_large())
                    parts.append(chunk)
                    if not msg.get("more_body", False):
                        return b"".join(parts)
        except TimeoutError:
            raise _BodyError(APIError(408, f"the request body was not received within {self.body_timeout:g} s",
                                      "invalid_request_error", None, "request_timeout")) from None

    @staticmethod
    async def _refuse(err: APIError, shape: ErrorShape, scope, receive, send):
        """Answer an error whose body was not (all) read, and close the connection: it cannot be reused."""
        err.headers = {**err.headers, "Connection": "close"}
        await error_response(err, shape)(scope, receive, send)


class _ParsedBodyRequest(Request):
    async def json(self):
        return self.scope[PARSED_JSON] if PARSED_JSON in self.scope else await super().json()


class ParsedBodyRoute(APIRoute):
    """A route that takes its JSON body as GateMiddleware already parsed it (`scope[PARSED_JSON]`) instead of
    FastAPI parsing the bytes a second time: a 2 MiB prompt costs one json.loads, not two."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parsed_once(request: Request):
            return await handler(_ParsedBodyRequest(request.scope, request.receive))

        return parsed_once


async def _off_loop(fn, *args):
    import anyio

    return await anyio.to_thread.run_sync(lambda: fn(*args))
