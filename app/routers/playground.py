"""``/``: the playground page (plain HTML, JavaScript and CSS from ``app/static/``, no build step).

The page holds no data: it calls the REST API from the browser with the user's API key, so it is
served without one, and it stays out of the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_PATH = "/static"
# the page loads its script and style from this server only, and talks only to this server
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    """The playground page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


def static_files() -> StaticFiles:
    """The page's script and style sheet, to mount at :data:`STATIC_PATH` (mounts stay out of the
    OpenAPI document)."""
    return StaticFiles(directory=STATIC_DIR)
