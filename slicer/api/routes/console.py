"""The web console (``/ui``, slicer/console) and its sessions, and ``/docs`` served offline.

The page is public (it holds no data); what it shows comes from the API, which takes the console's
session cookie as it takes a bearer token (slicer.api.sessions)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from slicer.api.deps import token_matches
from slicer.api.models import read_json_object
from slicer.api.sessions import COOKIE, LIFETIME
from slicer.core.errors import Unauthorized

STATIC = Path(__file__).resolve().parents[2] / "console" / "static"
router = APIRouter(include_in_schema=False)
# The page runs only its own scripts (no inline script), loads nothing from elsewhere, is never framed.
# Inline styles are allowed: xterm.js colours cells with style attributes.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                               "style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@router.get("/ui")
@router.get("/ui/")
async def console_page() -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/ui/session")
async def session_state(request: Request) -> dict:
    """Whether the API needs a token (``auth``) and whether this browser has a session."""
    auth = request.app.state.token is not None
    return {"auth": auth, "signed_in": not auth or request.app.state.sessions.valid(request.cookies.get(COOKIE))}


@router.post("/ui/session", status_code=204)
async def sign_in(request: Request) -> Response:
    """Body ``{"token": "<API token>"}``: a session cookie for the console (HttpOnly, SameSite=Strict)."""
    token = request.app.state.token
    body = await read_json_object(request, limit=4096)
    given = body.get("token")
    if token is not None and not (isinstance(given, str) and token_matches(f"Bearer {given}", token)):
        raise Unauthorized("that is not this daemon's API token (sudo cat /var/lib/slicer/auth/token)")
    response = Response(status_code=204)
    if token is not None:
        response.set_cookie(COOKIE, request.app.state.sessions.open(), max_age=LIFETIME, path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
    return response


@router.delete("/ui/session", status_code=204)
async def sign_out(request: Request) -> Response:
    request.app.state.sessions.close(request.cookies.get(COOKIE))
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/docs")
async def docs() -> HTMLResponse:
    """FastAPI's Swagger UI page with its files from this package (it would load them from a CDN)."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Slicer API",
                               swagger_js_url="/ui/static/vendor/swagger-ui-bundle.js",
                               swagger_css_url="/ui/static/vendor/swagger-ui.css",
                               swagger_favicon_url="data:,")

