"""``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served without the internet.

The Swagger UI and ReDoc scripts and styles come from the installed ``fastapi-offline`` package
(mounted at :data:`ASSETS_PATH`), never from a CDN, so the pages work on an offline deployment.
Each page carries a Content-Security-Policy that allows only this server's assets and the page's
own inline script (by its SHA-256). Who may read them is ``METASENT_OPS_ACCESS``
(:func:`app.main.create_app` adds the dependency).
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)
ASSETS_PATH = "/docs-assets"
OPENAPI_PATH = "/openapi.json"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def assets() -> StaticFiles:
    """The Swagger UI and ReDoc files of the installed ``fastapi-offline`` package."""
    return StaticFiles(directory=Path(str(files("fastapi_offline") / "static")))


def content_security_policy(html: str) -> str:
    """A CSP for ``html``: scripts from this server and the page's inline scripts (SHA-256 of each);
    styles, images, fonts, fetches and workers from this server only (plus inline styles, which
    Swagger UI sets, ``data:`` images and ReDoc's ``blob:`` search worker); no frames, forms or base."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = content_security_policy(bytes(page.body).decode())
    return page


@router.get(OPENAPI_PATH)
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI schema of the API."""
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over :data:`OPENAPI_PATH`, from the local assets."""
    root = request.scope.get("root_path", "")
    return _with_csp(
        get_swagger_ui_html(
            openapi_url=f"{root}{OPENAPI_PATH}",
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
        )
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc over :data:`OPENAPI_PATH`, from the local assets (no Google fonts)."""
    root = request.scope.get("root_path", "")
    return _with_csp(
        get_redoc_html(
            openapi_url=f"{root}{OPENAPI_PATH}",
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
    )
