"""The chat page: GET / and its files under GET /web/<name>, plain HTML, CSS and JavaScript shipped in
glm4/serve/web/ (no build step; nothing is fetched from anywhere else, so it works offline).

The page is a client of this server's own OpenAI API (/v1/models, /v1/chat/completions streamed): it holds no
data, so the API-key gate leaves its paths open (`is_page`) and the page asks for the key when the API answers 401.
Its Content-Security-Policy lets it load and talk to this origin only, and run no inline script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from glm4.serve.errors import APIError

WEB_DIR = Path(__file__).parent / "web"
PREFIX = "/web/"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


def is_page(path: str) -> bool:
    """Whether `path` is the page or one of its files (served without an API key)."""
    return path == "/" or path.startswith(PREFIX)


def _serve(name: str) -> Response:
    path = WEB_DIR / name
    if "/" in name or "\\" in name or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise APIError(404, f"Unknown route: GET {PREFIX}{name}", "invalid_request_error")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP,
               "Referrer-Policy": "no-referrer"}
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=headers)


@router.get("/")
async def index() -> Response:
    return _serve("index.html")


@router.get(PREFIX + "{name}")
async def asset(name: str) -> Response:
    return _serve(name)
