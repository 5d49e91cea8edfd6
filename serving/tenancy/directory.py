"""The router's view of tenants: an in-memory cache in front of the tenant table,
so that authenticating a request normally costs one hash and one dict lookup."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from router import Tenant
from serving.tenancy.tenants import TenantLookupError, TenantStore, hash_key, usable_key

log = logging.getLogger(__name__)

# The last part of a valid key's TTL in which a request starts its lookup in the
# background (TenantDirectory, "refresh ahead").
_REFRESH_AHEAD = 0.25


@dataclass
class _Entry:
    tenant: Tenant
    expires: float


class TenantDirectory:
    """Authenticates API keys for the router without blocking the event loop.

    Valid keys are cached by key hash for ``ttl_s`` and then looked up again, so a
    weight or model change, a rotation or a deletion takes effect within about that
    long. Unknown keys are cached for ``negative_ttl_s`` only, so a key created by
    the CLI a moment ago is found on its first use, while a flood of bad keys
    reaches the database at most once per key per interval. Concurrent requests
    with the same uncached key share one lookup.

    Refresh ahead: a request in the last quarter of a valid key's TTL is answered
    from the cache and starts the lookup in the background, so a key in steady use
    never makes a request wait for the database (beside a heavy tenant, a lookup on a
    thread contending for the GIL would land inside a light tenant's p99). A change
    still takes effect within the TTL.
    """

    def __init__(
        self,
        store: TenantStore,
        *,
        ttl_s: float = 2.0,
        negative_ttl_s: float = 0.25,
        max_negative_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl_s
        self._negative_ttl = negative_ttl_s
        self._max_negative = max_negative_entries
        self._clock = clock
        self._positive: dict[str, _Entry] = {}
        self._negative: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[Tenant | None]] = {}

    async def authenticate(self, api_key: str) -> Tenant | None:
        if not usable_key(api_key):
            return None
        h = hash_key(api_key)
        now = self._clock()
        entry = self._positive.get(h)
        if entry is not None and entry.expires > now:
            if entry.expires - now <= self._ttl * _REFRESH_AHEAD:
                self._lookup_task(h)  # not awaited: this request uses the cached entry
            return entry.tenant
        if self._negative.get(h, 0.0) > now:
            return None
        # shield: one caller giving up (client disconnect) must not cancel the lookup
        # the other callers are waiting on.
        return await asyncio.shield(self._lookup_task(h))

    def _lookup_task(self, h: str) -> asyncio.Task[Tenant | None]:
        """The lookup of ``h`` in progress, started if there is none."""
        task = self._inflight.get(h)
        if task is None:
            task = asyncio.create_task(self._lookup(h))
            self._inflight[h] = task
            task.add_done_callback(lambda t: self._forget_inflight(h, t))
        return task

    def _forget_inflight(self, h: str, task: asyncio.Task[Tenant | None]) -> None:
        if self._inflight.get(h) is task:
            del self._inflight[h]
        if not task.cancelled() and task.exception() is not None:
            # A background refresh has no caller to raise to; waiting callers got it.
            log.debug("tenant lookup failed: %s", task.exception())

    async def _lookup(self, h: str) -> Tenant | None:
        try:
            tenant = await asyncio.to_thread(self._store.get_by_key_hash, h)
        except sa.exc.SQLAlchemyError as exc:
            stale = self._positive.get(h)
            if stale is not None:
                # Keep serving a known tenant through a database outage rather than
                # failing all its traffic; try again after another TTL.
                log.warning(
                    "tenant lookup failed (%s); using cached tenant %s", exc, stale.tenant.name
                )
                stale.expires = self._clock() + self._ttl
                return stale.tenant
            raise TenantLookupError(f"tenant lookup failed: {exc}") from exc
        now = self._clock()
        if tenant is None:
            self._positive.pop(h, None)
            if len(self._negative) >= self._max_negative:
                self._prune_negative(now)
            self._negative[h] = now + self._negative_ttl
        else:
            self._negative.pop(h, None)
            self._positive[h] = _Entry(tenant, now + self._ttl)
        return tenant

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
