"""The web console's session cookie as the API takes it, /ui's headers and an offline /docs
(in-process; tests/test_console.py drives the page in a real browser)."""

from __future__ import annotations

import httpx

from slicer.api.app import create_app
from slicer.api.sessions import COOKIE
from tests.unit.conftest import Lab

BASE = "http://127.0.0.1"


async def test_a_session_cookie_acts_for_the_token_but_never_cross_site(lab: Lab) -> None:
    app = create_app(lab.manager(), token="unit-token")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as ui:
        assert (await ui.get("/ui/session")).json() == {"auth": True, "signed_in": False}
        assert (await ui.get("/nodes")).status_code == 401
        wrong = await ui.post("/ui/session", json={"token": "nope"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized" and COOKIE not in ui.cookies
        signed = await ui.post("/ui/session", json={"token": "unit-token"})
        assert signed.status_code == 204
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "unit-token" not in cookie
        assert (await ui.get("/ui/session")).json()["signed_in"] is True
        assert (await ui.get("/nodes")).status_code == 200  # a read by cookie alone
        # a state-changing request by cookie needs an Origin, and only the API's own passes
        assert (await ui.post("/secrets", json={"name": "s", "data": "YQ=="})).status_code == 401
        foreign = await ui.post("/secrets", json={"name": "s", "data": "YQ=="}, headers={"Origin": "http://evil.test"})
        assert foreign.status_code == 403
        own = await ui.post("/secrets", json={"name": "s", "data": "YQ=="}, headers={"Origin": BASE})
        assert own.status_code == 201
        assert (await ui.delete("/ui/session", headers={"Origin": BASE})).status_code == 204
        ui.cookies.clear()
        assert (await ui.get("/nodes")).status_code == 401


async def test_with_auth_off_there_is_no_sign_in(lab: Lab) -> None:
    app = create_app(lab.manager(), token=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as ui:
        assert (await ui.get("/ui/session")).json() == {"auth": False, "signed_in": True}


async def test_the_page_and_docs_load_nothing_from_elsewhere(lab: Lab) -> None:
    app = create_app(lab.manager(), token=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as ui:
        page = await ui.get("/ui")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        docs = (await ui.get("/docs")).text
        assert "/ui/static/vendor/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
        assert (await ui.get("/redoc")).status_code == 404
        assert (await ui.get("/ui/static/vendor/swagger-ui.css")).status_code == 200
        assert (await ui.get("/ui/static/../../api/app.py")).status_code == 404
