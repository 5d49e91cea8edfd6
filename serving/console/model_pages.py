"""Console pages of the model registry: versions by stage, a version's card and lineage,
and the approvals queue with approve and reject."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from starlette.responses import Response

from serving.console.web import Page, page

# Stages in the order a version moves through them (the registry's own order).
STAGE_ORDER = ("production", "staging", "approved", "registered", "rejected", "archived")
# A version waiting for approvers is in this stage.
AWAITING = "registered"


def _by_model(versions: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    models: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for v in versions:
        models[v["name"]][v["stage"]].append(v)
    return {
        name: {
            s: stages[s]
            for s in (*STAGE_ORDER, *sorted(set(stages) - set(STAGE_ORDER)))
            if s in stages
        }
        for name, stages in sorted(models.items())
    }


@page("/models")
async def models(page: Page) -> Response:
    versions = await page.get("/models")
    return page.render("models.html", models=_by_model(versions))


@page("/models/{name}/versions/{version}")
async def version_card(page: Page) -> Response:
    name = page.request.path_params["name"]
    version = page.request.path_params["version"]
    card = await page.get(f"/models/{name}/versions/{version}")
    lineage = await page.get(f"/models/{name}/versions/{version}/lineage")
    return page.render(
        "version.html", card=card, lineage=lineage, may_decide=_may_decide(page, card)
    )


def _may_decide(page: Page, version: dict[str, Any]) -> bool:
    """Whether to offer approve/reject: an approver, not the version's author, and the
    version still waiting. The API refuses the others anyway."""
    return (
        page.may("models.approve")
        and version["author"] != page.user.name
        and version["stage"] == AWAITING
    )


@page("/approvals")
async def approvals(page: Page) -> Response:
    versions = await page.get("/models")
    waiting = sorted((v for v in versions if v["stage"] == AWAITING), key=lambda v: v["created_at"])
    cards = [await page.get(f"/models/{v['name']}/versions/{v['version']}") for v in waiting]
    return page.render(
        "approvals.html",
        waiting=[(card, _may_decide(page, card)) for card in cards],
    )


async def _decide(page: Page, decision: str) -> Response:
    name = page.request.path_params["name"]
    version = page.request.path_params["version"]
    reason = page.form.get("reason", "").strip()
    await page.post(f"/models/{name}/versions/{version}/{decision}", {"reason": reason})
    verb = "Approved" if decision == "approve" else "Rejected"
    back = page.form.get("back") or "/approvals"
    return page.done(back if back.startswith("/") else "/approvals", f"{verb} {name}:{version}.")


@page("/models/{name}/versions/{version}/approve", ("POST",))
async def approve(page: Page) -> Response:
    return await _decide(page, "approve")


@page("/models/{name}/versions/{version}/reject", ("POST",))
async def reject(page: Page) -> Response:
    return await _decide(page, "reject")


ROUTES = [models, version_card, approvals, approve, reject]
