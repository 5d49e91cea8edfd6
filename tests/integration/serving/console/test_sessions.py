"""The web console's sign-in, sessions and CSRF over a real socket, on a SQLite file and
PostgreSQL: the console app mounted beside the admin API, as the gateway serves them.

What a browser does is driven by hand here (cookies, form fields), so each refusal can
be checked on its own: a tenant key in place of a user token, a missing or wrong CSRF
token, an expired session, a session whose user was disabled or whose token was rotated,
and an action the user's role may not do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import sqlalchemy as sa

from serving.state import audit, console_sessions
from serving.tenancy import TenantStore
from tests.integration.serving.admin.server import AdminServer
from tests.integration.serving.console.harness import Console, field, sign_in


def test_sign_in_sets_a_strict_http_only_session_cookie(console) -> None:  # type: ignore[no-untyped-def]
    c, server = console
    with c.browser(server) as b:
        page = b.get("/console/")
        assert page.status_code == 303 and page.headers["location"].startswith("/console/login")
        signed = sign_in(b, c.admin_token)
        assert signed.status_code == 303 and signed.headers["location"] == "/console/"
        cookie = signed.headers["set-cookie"]
        assert "gpugate_session=ggs_" in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert "Max-Age=" in cookie and "Secure" not in cookie  # plain HTTP here
        models = b.get("/console/models")
        assert models.status_code == 200 and "admin" in models.text
        csp = models.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert models.headers["cache-control"] == "no-store"
        # The session row keeps no secret of the cookie's.
        with c.engine.connect() as conn:
            rows = conn.execute(sa.select(console_sessions)).all()
        secret = b.cookies["gpugate_session"]
        assert len(rows) == 1 and secret not in str(rows[0])


def test_behind_a_tls_balancer_cookies_are_secure(open_db, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With server.console.secure_cookies (TLS ends at a balancer in front), the cookies
    are Secure and every answer carries HSTS, though this socket is plain HTTP."""
    c = Console(open_db(), tmp_path / "state", secure_cookies=True)
    with AdminServer(c.app) as server, c.browser(server) as b:
        form = b.get("/console/login")
        assert "Secure" in form.headers["set-cookie"]  # the sign-in form's CSRF cookie
        assert form.headers["strict-transport-security"] == "max-age=31536000"
        # httpx keeps a Secure cookie from plain HTTP but does not send it back: by hand.
        signed = b.post(
            "/console/login",
            data={"token": c.admin_token, "login_csrf": field(form.text, "login_csrf")},
            cookies={"gpugate_login": field(form.text, "login_csrf")},
        )
        assert signed.status_code == 303, signed.text
        cookie = signed.headers["set-cookie"]
        assert "gpugate_session=ggs_" in cookie and "Secure" in cookie and "HttpOnly" in cookie
    # Without the setting, plain HTTP sends no HSTS.
    plain = Console(open_db(), tmp_path / "state")
    with AdminServer(plain.app) as server, plain.browser(server) as b:
        assert "strict-transport-security" not in b.get("/console/login").headers


def test_a_tenant_key_or_an_unknown_token_cannot_sign_in(console) -> None:  # type: ignore[no-untyped-def]
    c, server = console
    key = TenantStore(c.engine).create("acme", actor="test")
    with c.browser(server) as b:
        for token in (key, "ggu_not-a-token", ""):
            refused = sign_in(b, token)
            assert refused.status_code == 401, token
            assert "API key cannot sign in" in refused.text
            assert "gpugate_session" not in refused.headers.get("set-cookie", "")
        # The page asked for survives a refused sign-in.
        form = b.get("/console/login", params={"next": "/console/costs"})
        again = b.post(
            "/console/login",
            data={
                "login_csrf": field(form.text, "login_csrf"),
                "token": "ggu_wrong",
                "next": field(form.text, "next"),
            },
        )
        assert again.status_code == 401 and field(again.text, "next") == "/console/costs"
        # A form from elsewhere (no login cookie, or another's token) is refused.
        forged = b.post("/console/login", data={"login_csrf": "x", "token": c.admin_token})
        assert forged.status_code == 403
        assert "gpugate_session" not in forged.headers.get("set-cookie", "")


def test_forms_need_the_session_csrf_token(console) -> None:  # type: ignore[no-untyped-def]
    c, server = console
    TenantStore(c.engine).create("acme", actor="test")
    with c.browser(server) as b:
        sign_in(b, c.admin_token)
        for csrf in (None, "wrong"):
            data = {"reason": "x"} | ({"csrf": csrf} if csrf else {})
            refused = b.post("/console/models/digits/versions/1/approve", data=data)
            assert refused.status_code == 403 and "CSRF" in refused.text
        # Signing out needs it too, and then the session is gone on the server.
        assert b.post("/console/logout", data={"csrf": "wrong"}).status_code == 403
        csrf = field(b.get("/console/models").text, "csrf")
        secret = b.cookies["gpugate_session"]
        out = b.post("/console/logout", data={"csrf": csrf})
        assert out.status_code == 303 and "signed_out=1" in out.headers["location"]
        with c.engine.connect() as conn:
            assert (
                conn.execute(sa.select(sa.func.count()).select_from(console_sessions)).scalar() == 0
            )
        # Signing in and out are both on record; a second sign-out of the gone session
        # (its cookie replayed) records nothing more.
        b.cookies.set("gpugate_session", secret, path="/console")
        assert b.post("/console/logout", data={"csrf": csrf}).status_code == 303
    actions = [(r.actor, r.action) for r in audit.read(c.engine) if r.action.startswith("console.")]
    assert actions == [("admin", "console.sign_in"), ("admin", "console.sign_out")]


def test_an_expired_session_is_refused(console) -> None:  # type: ignore[no-untyped-def]
    c, server = console

    def expire() -> None:
        with c.engine.begin() as conn:
            past = datetime.now(UTC) - timedelta(seconds=1)
            conn.execute(console_sessions.update().values(expires_at=past))

    with c.browser(server) as b:
        sign_in(b, c.admin_token)
        assert b.get("/console/models").status_code == 200
        expire()
        page = b.get("/console/models")
        assert page.status_code == 303 and "expired=1" in page.headers["location"]
        assert "Your session has expired" in b.get(page.headers["location"]).text
        # An action with an expired session is refused, and nothing is done.
        sign_in(b, c.admin_token)
        csrf = field(b.get("/console/models").text, "csrf")
        expire()
        action = b.post("/console/rollouts/digits/abort", data={"csrf": csrf, "reason": "x"})
        assert action.status_code == 401 and "expired" in action.text


def test_a_session_ends_with_its_user_token(console) -> None:  # type: ignore[no-untyped-def]
    """Disabling the user or rotating the token ends its sessions for good (the changes
    are made through the admin API, as an admin would)."""
    c, server = console
    token = c.users.create("erin", "auditor", actor="admin")
    bearer = {"Authorization": f"Bearer {c.admin_token}"}
    with (
        c.browser(server) as b,
        c.browser(server) as b2,
        httpx.Client(base_url=server.url + "/admin", headers=bearer) as admin,
    ):
        sign_in(b, token)
        assert b.get("/console/models").status_code == 200
        cookie = b.cookies["gpugate_session"]
        assert admin.post("/users/erin/disable", json={"reason": "x"}).status_code == 200
        assert b.get("/console/models").status_code == 303
        assert admin.post("/users/erin/enable").status_code == 200
        # The old cookie does not come back to life with the user.
        b.cookies.clear()
        b.cookies.set("gpugate_session", cookie, path="/console")
        assert b.get("/console/models").status_code == 303
        assert sign_in(b, token).status_code == 303
        assert b.get("/console/models").status_code == 200
        sign_in(b2, token)
        assert b2.get("/console/models").status_code == 200
        assert admin.post("/users/erin/rotate", json={}).status_code == 200
        assert b2.get("/console/models").status_code == 303
        assert b.get("/console/models").status_code == 303


def test_a_role_that_may_not_act_gets_the_api_reason(console) -> None:  # type: ignore[no-untyped-def]
    c, server = console
    token = c.users.create("fin", "finance", actor="admin")
    with c.browser(server) as b:
        sign_in(b, token)
        page = b.get("/console/costs")
        assert page.status_code == 200
        nav = page.text[: page.text.index("</nav>")]
        assert "/console/costs" in nav and "/console/tenants" not in nav
        csrf = field(page.text, "csrf")
        refused = b.post("/console/rollouts/digits/abort", data={"csrf": csrf, "reason": "x"})
        assert refused.status_code == 403
        assert "user &#39;fin&#39; (role finance) may not models.promote" in refused.text
