"""Console pages of canary rollouts: every model's rollout, and one rollout's live
weights, step, last analysis and history, with pause, resume, promote and abort."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from serving.console.api import Refused
from serving.console.web import Page, page

COMMANDS = ("pause", "resume", "promote", "abort")
# Which commands a rollout in each live state takes (the API refuses the others).
OFFERED = {"running": ("pause", "promote", "abort"), "paused": ("resume", "promote", "abort")}


@page("/rollouts")
async def rollouts(page: Page) -> Response:
    listed = await page.get("/rollouts")
    live_first = sorted(listed, key=lambda r: (r["state"] not in OFFERED, r["model"]))
    return page.render("rollouts.html", rollouts=live_first)


async def _status(page: Page) -> dict[str, Any]:
    status: dict[str, Any] = await page.get(f"/models/{page.request.path_params['model']}/rollout")
    return status


@page("/rollouts/{model}")
async def rollout(page: Page) -> Response:
    ro = await _status(page)
    offered = OFFERED.get(ro["state"], ()) if page.may("models.promote") else ()
    return page.render("rollout.html", ro=ro, offered=offered)


@page("/rollouts/{model}/live")
async def rollout_live(page: Page) -> Response:
    """The part of the rollout page that follows the rollout (fetched every few seconds
    by the page's script)."""
    return page.render("rollout_live.html", ro=await _status(page))


@page("/rollouts/{model}/{command}", ("POST",))
async def rollout_command(page: Page) -> Response:
    model, command = page.request.path_params["model"], page.request.path_params["command"]
    if command not in COMMANDS:
        raise Refused(404, f"no rollout command {command!r}: one of {', '.join(COMMANDS)}")
    await page.post(
        f"/models/{model}/rollout/{command}", {"reason": page.form.get("reason", "").strip()}
    )
    return page.done(f"/rollouts/{model}", f"Rollout of {model}: {command} done.")


ROUTES = [rollouts, rollout, rollout_live, rollout_command]
