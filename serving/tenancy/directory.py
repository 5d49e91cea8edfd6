"""The router's view of tenants: an in-memory cache in front of the tenant table,
so that authenticating a request normally costs one hash and one dict lookup."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from router import Tenant
from serving.state import utcnow
from serving.tenancy.quotas import NONE as NO_QUOTAS
from serving.tenancy.quotas import QuotaStore
from serving.tenancy.tenants import (
    KeyMatch,
    TenantLookupError,
    TenantStore,
    hash_key,
    usable_key,
)

log = logging.getLogger(__name__)

# The last part of a valid key's TTL in which a request starts its lookup in the
# background (TenantDirectory, "refresh ahead").
_REFRESH_AHEAD = 0.25
# How often a gateway writes the keys' last-used times (and so at most how often per key).
TOUCH_INTERVAL_S = 60.0


@dataclass
class _Entry:
    tenant: Tenant
    key_id: int
    expires: float  # when the entry is looked up again (clock time)
    # When the key itself expires (clock time; inf: never): no entry outlives it.
    key_deadline: float = math.inf


class TenantDirectory:
    """Authenticates API keys for the router without blocking the event loop.

    Valid keys are cached by key hash for ``ttl_s`` and then looked up again, so a
    weight or model change, a suspension, a revocation or a deletion takes effect
    within about that long. A key with an expiry is never cached past it: it is
    refused at its expiry. Unknown keys are cached for ``negative_ttl_s`` only, so a
    key created by the CLI a moment ago is found on its first use, while a flood of bad
    keys reaches the database at most once per key per interval. Concurrent requests
    with the same uncached key share one lookup.

    Refresh ahead: a request in the last quarter of a valid key's TTL is answered
    from the cache and starts the lookup in the background, so a key in steady use
    never makes a request wait for the database (beside a heavy tenant, a lookup on a
    thread contending for the GIL would land inside a light tenant's p99). A change
    still takes effect within the TTL.

    Last use: each key's last use is noted in memory and written every
    ``touch_interval_s`` (one statement per key used since), on a thread, never on a
    request's path; :meth:`close` writes what is left.
    """

    def __init__(
        self,
        store: TenantStore,
        quotas: QuotaStore | None = None,
        *,
        guard: Callable[[Tenant], Tenant] | None = None,
        ttl_s: float = 2.0,
        negative_ttl_s: float = 0.25,
        max_negative_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utcnow,
        touch_interval_s: float = TOUCH_INTERVAL_S,
    ) -> None:
        self._store = store
        self._quotas = quotas
        self._guard = guard
        self._ttl = ttl_s
        self._negative_ttl = negative_ttl_s
        self._max_negative = max_negative_entries
        self._clock = clock
        self._wall = wall_clock
        self._touch_interval = touch_interval_s
        self._positive: dict[str, _Entry] = {}
        self._negative: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[_Entry | None]] = {}
        self._used: dict[int, datetime] = {}
        self._touch_timer: asyncio.TimerHandle | None = None
        self._touch_loop: asyncio.AbstractEventLoop | None = None
        self._touching: asyncio.Task[None] | None = None

    async def authenticate(self, api_key: str) -> Tenant | None:
        if not usable_key(api_key):
            return None
        h = hash_key(api_key)
        now = self._clock()
        entry = self._positive.get(h)
        if entry is not None and entry.expires > now:
            if entry.expires - now <= self._ttl * _REFRESH_AHEAD and entry.key_deadline > now:
                self._lookup_task(h)  # not awaited: this request uses the cached entry
            self._note_use(entry.key_id)
            return entry.tenant
        if self._negative.get(h, 0.0) > now:
            return None
        # shield: one caller giving up (client disconnect) must not cancel the lookup
        # the other callers are waiting on.
        found = await asyncio.shield(self._lookup_task(h))
        if found is None:
            return None
        self._note_use(found.key_id)
        return found.tenant

    def _lookup_task(self, h: str) -> asyncio.Task[_Entry | None]:
        """The lookup of ``h`` in progress, started if there is none."""
        task = self._inflight.get(h)
        if task is None:
            task = asyncio.create_task(self._lookup(h))
            self._inflight[h] = task
            task.add_done_callback(lambda t: self._forget_inflight(h, t))
        return task

    def _forget_inflight(self, h: str, task: asyncio.Task[_Entry | None]) -> None:
        if self._inflight.get(h) is task:
            del self._inflight[h]
        if not task.cancelled() and task.exception() is not None:
            # A background refresh has no caller to raise to; waiting callers got it.
            log.debug("tenant lookup failed: %s", task.exception())

    async def _lookup(self, h: str) -> _Entry | None:
        try:
            found = await asyncio.to_thread(self._find, h)
        except sa.exc.SQLAlchemyError as exc:
            stale = self._positive.get(h)
            if stale is not None and stale.key_deadline > self._clock():
                # Keep serving a known tenant through a database outage rather than
                # failing all its traffic; try again after another TTL (never past the
                # key's own expiry).
                log.warning(
                    "tenant lookup failed (%s); using cached tenant %s", exc, stale.tenant.name
                )
                stale.expires = min(self._clock() + self._ttl, stale.key_deadline)
                return stale
            raise TenantLookupError(f"tenant lookup failed: {exc}") from exc
        now = self._clock()
        if found is None:
            self._positive.pop(h, None)
            if len(self._negative) >= self._max_negative:
                self._prune_negative(now)
            self._negative[h] = now + self._negative_ttl
            return None
        deadline = math.inf
        if found.expires_at is not None:
            # The key's expiry, on this clock: a cached key is refused at its expiry.
            deadline = now + (found.expires_at - self._wall()).total_seconds()
        entry = _Entry(found.tenant, found.key_id, min(now + self._ttl, deadline), deadline)
        self._negative.pop(h, None)
        self._positive[h] = entry
        return entry

    def _find(self, h: str) -> KeyMatch | None:
        """The key hash ``h``'s tenant with its rate quotas, through ``guard`` (what its
        budget makes of it), in a worker thread."""
        found = self._store.lookup_key(h)
        if found is None:
            return found
        tenant = found.tenant
        if self._quotas is not None:
            quotas = self._quotas.of(tenant.name)
            if quotas is not NO_QUOTAS:
                tenant = dataclasses.replace(
                    tenant, quota=quotas.quota, model_quotas=quotas.model_quotas
                )
        if self._guard is not None:
            tenant = self._guard(tenant)
        return found if tenant is found.tenant else dataclasses.replace(found, tenant=tenant)

    def _prune_negative(self, now: float) -> None:
        self._negative = {h: t for h, t in self._negative.items() if t > now}
        if len(self._negative) >= self._max_negative:
            # Still full of live entries: a flood of distinct keys. Dropping them only
            # costs extra lookups; growing without bound would cost the process.
            self._negative.clear()

    def invalidate(self) -> None:
        """Forget every cached result (e.g. after this process changed tenants)."""
        self._positive.clear()
        self._negative.clear()

    # -- last use ------------------------------------------------------------------

    def _note_use(self, key_id: int) -> None:
        self._used[key_id] = self._wall()
        loop = asyncio.get_running_loop()
        if self._touch_timer is not None and self._touch_loop is loop:
            return  # a write is due already
        self._touch_loop = loop
        self._touch_timer = loop.call_later(self._touch_interval, self._start_touch)

    def _start_touch(self) -> None:
        self._touch_timer = None
        if self._touching is None or self._touching.done():
            self._touching = asyncio.create_task(self.write_last_used())

    async def write_last_used(self) -> None:
        """Write the last-used times noted since the last write (on a thread)."""
        used, self._used = self._used, {}
        if not used:
            return
        try:
            # Half the interval: another gateway's write of the same key a moment ago
            # makes this one unnecessary, a write of the previous round does not.
            await asyncio.to_thread(
                self._store.touch_keys, used, interval_s=self._touch_interval / 2
            )
        except sa.exc.SQLAlchemyError as exc:
            # Only a record of use: not worth a retry loop, and never a request's failure.
            log.warning("cannot record when %d API keys were last used: %s", len(used), exc)

    async def close(self) -> None:
        """Stop the periodic write and write what is left (the gateway's shutdown)."""
        if self._touch_timer is not None:
            self._touch_timer.cancel()
            self._touch_timer = None
        touching = self._touching
        if touching is not None and touching.get_loop() is asyncio.get_running_loop():
            await touching
        await self.write_last_used()
