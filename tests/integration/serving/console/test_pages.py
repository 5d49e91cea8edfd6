"""The console's pages and actions over a real socket, on a SQLite file and PostgreSQL, with
data made through the admin API: what each role sees, what it may do, and that the page
shows the API's figures and refusals."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path

import httpx

from serving.costs import render_report
from tests.integration.serving.admin.server import AdminServer, digits_weights
from tests.integration.serving.console.harness import field, sign_in

SIGNATURE = {"input": ["pixels:FP32:64"], "output": ["logits:FP32:10"]}


def _register(api: httpx.Client, path: Path, metric: float, parent: str | None = None) -> str:
    data = path.read_bytes()
    params: dict[str, object] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": "safetensors",
        "model_class": "serving.demo:DigitsMLP",
        "model_kwargs": '{"hidden": 16}',
        "metric": [f"accuracy={metric}"],
        "source": "runs:/exp-7/run-42",
        "dataset_digest": "sha256:" + "ab" * 8,
        "code_revision": "deadbeef",
        **({"parent": parent} if parent else {}),
        **SIGNATURE,
    }
    made = api.post(
        "/models/digits/versions",
        params=params,
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    assert made.status_code == 201, made.text
    return str(made.json()["version"])


def _api(server: AdminServer, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.url + "/admin", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def test_approvals_follow_roles_and_separation_of_duties(console, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c, server = console
    dora = c.users.create("dora", "deployer", actor="admin")
    abe = c.users.create("abe", "approver", actor="admin")
    with _api(server, dora) as api:
        version = _register(api, digits_weights(tmp_path / "w.safetensors"), 0.91)
    card_path = f"/console/models/digits/versions/{version}"
    with c.browser(server) as author, c.browser(server) as approver:
        sign_in(author, dora)
        queue = author.get("/console/approvals")
        assert queue.status_code == 200 and f"digits:{version}" in queue.text
        assert "Approve" not in queue.text and 'id="own-version"' in queue.text
        # The server refuses the author even with a well-formed form.
        csrf = field(queue.text, "csrf")
        own = author.post(f"{card_path}/approve", data={"csrf": csrf, "reason": "mine"})
        assert own.status_code in (403, 409), own.text
        assert "refusal" in own.text and "dora" in own.text

        sign_in(approver, abe)
        queue = approver.get("/console/approvals")
        assert 'formaction="/console/models/digits/versions/' in queue.text
        csrf = field(queue.text, "csrf")
        done = approver.post(f"{card_path}/approve", data={"csrf": csrf, "reason": "looks good"})
        assert (
            done.status_code == 303
            and "Approved" in httpx.URL(done.headers["location"]).params["done"]
        )
        card = approver.get(card_path)
        assert card.status_code == 200
        assert "abe</strong> approved" in card.text and "looks good" in card.text
        # The card: digest, size, signature, metrics and lineage as registered.
        with _api(server, abe) as api:
            shown = api.get(f"/models/digits/versions/{version}").json()
        assert shown["sha256"] in card.text and f"{shown['size_bytes']:,}" in card.text
        assert "runs:/exp-7/run-42" in card.text and "deadbeef" in card.text
        assert "pixels" in card.text and "64" in card.text and "0.9100" in card.text
        models = approver.get("/console/models")
        assert f"digits:{version}" in models.text and shown["stage"] in models.text


def test_each_role_sees_its_pages_and_is_refused_the_others(console) -> None:  # type: ignore[no-untyped-def]
    c, server = console
    tokens = {role: c.users.create(f"u-{role}", role, actor="admin") for role in (
        "deployer", "approver", "finance", "auditor"
    )}  # fmt: skip
    tokens["admin"] = c.admin_token
    may = {
        "/console/": {"admin", "deployer", "approver", "finance", "auditor"},
        "/console/models": {"admin", "deployer", "approver", "finance", "auditor"},
        "/console/approvals": {"admin", "deployer", "approver", "finance", "auditor"},
        "/console/rollouts": {"admin", "deployer", "approver", "finance", "auditor"},
        "/console/costs": {"admin", "finance"},
        "/console/tenants": {"admin", "auditor"},
        "/console/audit": {"admin", "auditor"},
    }
    for role, token in tokens.items():
        with c.browser(server) as b:
            sign_in(b, token)
            for path, roles in may.items():
                answer = b.get(path)
                if role in roles:
                    assert answer.status_code == 200, (role, path, answer.text[-300:])
                    assert (
                        f'href="{path.rstrip("/") or "/console"}' in answer.text
                        or path == "/console/"
                    )
                else:
                    assert answer.status_code == 403, (role, path)
                    assert f"(role {role}) may not" in answer.text
                    nav = answer.text[: answer.text.index("</nav>")]
                    assert f'href="{path}"' not in nav


def test_tenants_keys_and_the_costs_download(console) -> None:  # type: ignore[no-untyped-def]
    c, server = console
    with c.browser(server) as b:
        sign_in(b, c.admin_token)
        page = b.get("/console/tenants")
        made = b.post(
            "/console/tenants",
            data={"csrf": field(page.text, "csrf"), "name": "acme", "weight": "3", "models": "*"},
        )
        assert made.status_code == 200, made.text
        key = re.search(r'id="issued-key">([^<]+)<', made.text)
        assert key and key.group(1).startswith("gg_")
        with _api(server, c.admin_token) as api:
            assert api.get("/tenants").json()[0]["weight"] == 3
            keys = api.get("/tenants/acme/keys").json()
        assert len(keys) == 1 and keys[0]["fingerprint"] in made.text
        # The new key is not shown again.
        assert key.group(1) not in b.get("/console/tenants/acme").text
        csrf = field(made.text, "csrf")
        extra = b.post(
            "/console/tenants/acme/keys",
            data={"csrf": csrf, "label": "ci", "expires_in_days": "7"},
        )
        assert extra.status_code == 200 and "“ci”" in extra.text
        revoked = b.post(
            f"/console/tenants/acme/keys/{keys[0]['key_id']}/revoke",
            data={"csrf": csrf, "reason": "leaked"},
        )
        assert revoked.status_code == 303
        # The action's notice shows where it leads; the same words in a link made
        # elsewhere (no seal, or another message under this seal) show nothing.
        landed = b.get(revoked.headers["location"])
        assert re.search(r'class="notice" role="status">[^<]*revoked', landed.text), landed.text
        sealed = dict(httpx.URL(revoked.headers["location"]).params)
        for forged in (
            {"done": "Security alert: sign in again at evil.example"},
            {"done": "Security alert: sign in again at evil.example", "seal": sealed["seal"]},
        ):
            shown = b.get("/console/tenants/acme", params=forged)
            assert shown.status_code == 200 and "Security alert" not in shown.text
        with _api(server, c.admin_token) as api:
            status = {k["label"]: k["status"] for k in api.get("/tenants/acme/keys").json()}
            audit = api.get("/audit").json()
        assert status == {"default": "revoked", "ci": "active"}
        assert any(r["action"] == "tenant.key.revoke" and r["reason"] == "leaked" for r in audit)
        bad = b.post("/console/tenants", data={"csrf": csrf, "name": "acme", "weight": "x"})
        assert bad.status_code == 400 and "must be a number" in bad.text

        # The download is the report's CSV for the same range and grouping.
        window = {"from": "2026-11-01", "to": "2026-11-30", "group_by": "tenant,model,version"}
        download = b.get("/console/costs.csv", params=window)
        assert download.status_code == 200
        assert download.headers["content-type"].startswith("text/csv")
        assert "attachment" in download.headers["content-disposition"]
        with _api(server, c.admin_token) as api:
            report = api.get("/costs", params=window).json()
        assert download.text == render_report(report, "csv")
        rows = list(csv.reader(io.StringIO(download.text)))
        assert rows[0][:3] == ["tenant", "model", "version"] and rows[-1][0] == "TOTAL"

        log = b.get("/console/audit", params={"action": "tenant.key.*"})
        assert log.status_code == 200 and "tenant.key.revoke" in log.text
        assert "tenant.create" not in log.text and "The chain verifies" in log.text
        # Several values of a filter (the overview's promotions link repeats `action`).
        for query in (
            [("action", "tenant.create"), ("action", "tenant.key.revoke")],
            [("action", "tenant.create, tenant.key.revoke")],
        ):
            both = b.get("/console/audit", params=query)
            assert both.status_code == 200, both.text
            assert "tenant.create" in both.text and "tenant.key.revoke" in both.text
            assert "tenant.key.create" not in both.text
            assert 'value="tenant.create tenant.key.revoke"' in both.text


def test_bad_input_gets_a_clear_4xx_page(console) -> None:  # type: ignore[no-untyped-def]
    """Whatever a browser (or a hand) sends is answered 4xx with the reason; no 5xx."""
    c, server = console
    with c.browser(server) as b:
        sign_in(b, c.admin_token)
        csrf = field(b.get("/console/models").text, "csrf")
        gets = [
            "/console/models/a%00b/versions/1",
            "/console/models/digits/versions/" + "x" * 5000,
            "/console/models/nope/versions/1",
            "/console/audit?before=abc",
            "/console/audit?since=yesterday",
            "/console/audit?action=" + "a" * 400,
            "/console/costs?from=2026-13-45",
            "/console/costs.csv?group_by=bogus",
            "/console/rollouts/nope",
            "/console/tenants/nope",
        ]
        for path in gets:
            answer = b.get(path)
            assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text[-300:])
            assert 'id="refusal"' in answer.text, path
        live = b.get("/console/rollouts/nope/live", headers={"X-Console-Fragment": "1"})
        assert live.status_code == 404 and live.text.startswith('<p class="error"')
        posts = [
            ("/console/rollouts/digits/explode", {"reason": "x"}),
            ("/console/tenants", {"name": "ok", "weight": "nan"}),
            ("/console/tenants", {"name": "bad name!", "weight": "1"}),
            ("/console/tenants/nope/keys/1/rotate", {"grace_s": "-5"}),
            ("/console/tenants/nope/keys", {"label": "x", "expires_in_days": "1e400"}),
        ]
        for path, data in posts:
            answer = b.post(path, data={"csrf": csrf, **data})
            assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text[-300:])
        junk = b.post(
            "/console/tenants", content=b"\xff\xfe" * 10, headers={"content-type": "text/plain"}
        )
        assert junk.status_code == 400
        assert b.get("/console/models").status_code == 200  # still up


def test_deleted_tenants_are_listed_and_shown(console) -> None:  # type: ignore[no-untyped-def]
    """A deleted tenant stays on record: the list with deleted tenants shown, and its own
    page, answer 200 without a budget (a deleted tenant has none)."""
    c, server = console
    with _api(server, c.admin_token) as api:
        for name in ("acme", "gone"):
            assert api.post("/tenants", json={"name": name}).status_code == 201
        budget = {"unit": "device_hours", "amount": 5}
        assert api.put("/tenants/gone/budget", json=budget).status_code == 200
        assert api.delete("/tenants/gone").status_code == 200
    with c.browser(server) as b:
        sign_in(b, c.admin_token)
        shown = b.get("/console/tenants", params={"all": "1"})
        assert shown.status_code == 200, shown.text
        assert "/console/tenants/gone" in shown.text and "/console/tenants/acme" in shown.text
        assert "/console/tenants/gone" not in b.get("/console/tenants").text
        own = b.get("/console/tenants/gone")
        assert own.status_code == 200, own.text
        assert "deleted" in own.text
