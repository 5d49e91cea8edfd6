"""Refusals for load, answered after a short hold.

A call refused for load (429 / RESOURCE_EXHAUSTED: the tenant's in-flight caps or rate
quotas, a full queue) tells its client to wait ``retry_after_s``. A client that calls
again at once instead makes the gateway take, read, decode and refuse each call as fast
as it can send them: with maximum-size messages on a few connections, thousands a second,
which is the gateway's CPU, paid by every other tenant. Holding each such answer for
``hold_s`` first bounds that to the client's open calls per ``hold_s``, while a client that
honours the retry delay loses nothing (it would wait longer anyway).

A held call keeps only its call slot: the door drops the request message before the hold.
At most ``max_per_tenant`` answers of one tenant are held at once, and the rest are
answered at once, so that one tenant cannot fill the port's call slots with refusals. The
hold never takes more than half of what is left of the call's deadline, so the caller
still sees the refusal and not its own deadline.
"""

from __future__ import annotations

import asyncio


class RefusalHold:
    """How long each refusal for load waits before it is answered; see the module."""

    def __init__(self, hold_s: float, max_per_tenant: int) -> None:
        self.hold_s = hold_s
        self.max_per_tenant = max_per_tenant
        self._held: dict[str, int] = {}  # tenant -> answers held now; idle tenants absent

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def total(self) -> int:
        """Answers held now, all tenants (a gauge reads it at scrape time)."""
        return sum(self._held.values())

    async def hold(self, tenant: str | None, time_remaining_s: float | None = None) -> None:
        """Wait before the tenant's refusal is answered (at once past its bound, or with
        no tenant known: a refusal before the key was checked is not load)."""
        delay = self.hold_s
        if time_remaining_s is not None:
            delay = min(delay, time_remaining_s / 2)
        if tenant is None or delay <= 0:
            return
        held = self._held.get(tenant, 0)
        if held >= self.max_per_tenant:
            return
        self._held[tenant] = held + 1
        try:
            await asyncio.sleep(delay)
        finally:
            left = self._held[tenant] - 1
            if left:
                self._held[tenant] = left
            else:
                del self._held[tenant]
