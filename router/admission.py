"""Per-tenant admission: what each tenant has in flight, against its caps.

A tenant may have at most ``max_requests_in_flight`` requests admitted and not yet
answered, and their input tensors may total at most ``max_bytes_in_flight`` bytes (the
tenant's record, else the server's defaults). Past either the answer is 429 /
RESOURCE_EXHAUSTED with a retry delay; one request larger than the whole byte cap is 413
(waiting would never help). Only tenants with something in flight have an entry, so the
table does not grow with the tenants seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from router._exceptions import PayloadTooLarge, ResourceExhausted
from router.metrics import RouterMetrics
from router.types import Tenant


@dataclass
class TenantLoad:
    """One tenant's admitted requests and their input bytes, over every model."""

    requests: int = 0
    bytes: int = 0


class TenantLoads:
    """The in-flight table and its caps; the service's calls hold what it hands out."""

    def __init__(
        self,
        max_requests: int,
        max_bytes: int,
        retry_after_s: float,
        metrics: RouterMetrics,
    ) -> None:
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._retry_after_s = retry_after_s
        self._metrics = metrics
        self._loads: dict[str, TenantLoad] = {}
        metrics.watch_tenant_loads(lambda: self._loads)

    @property
    def loads(self) -> Mapping[str, TenantLoad]:
        return self._loads

    def take_request(self, tenant: Tenant) -> TenantLoad:
        """One of the tenant's in-flight requests, or ResourceExhausted."""
        cap = tenant.max_requests_in_flight
        if cap is None:
            cap = self._max_requests
        load = self._loads.get(tenant.name)
        held = load.requests if load is not None else 0
        if held >= cap:
            self._metrics.refused(tenant.name, "requests_in_flight")
            raise ResourceExhausted(
                f"tenant {tenant.name!r} has {held} requests in flight, its limit",
                retry_after_s=self._retry_after_s,
            )
        if load is None:
            load = self._loads[tenant.name] = TenantLoad()
        load.requests += 1
        return load

    def take_bytes(self, tenant: Tenant, load: TenantLoad, held: int, size: int) -> None:
        """Move a call that holds ``held`` bytes of ``load`` to exactly ``size``, or
        refuse: PayloadTooLarge when ``size`` alone is over the cap, ResourceExhausted
        when the tenant's other calls leave too little room."""
        cap = tenant.max_bytes_in_flight
        if cap is None:
            cap = self._max_bytes
        if size > cap:
            # Never admissible, however long the client waits: not a 429.
            self._metrics.refused(tenant.name, "request_bytes")
            raise PayloadTooLarge(
                f"the request's {size} input bytes exceed tenant {tenant.name!r}'s "
                f"{cap}-byte limit of bytes in flight"
            )
        others = load.bytes - held  # what the tenant's other calls hold
        if others + size > cap:
            self._metrics.refused(tenant.name, "bytes_in_flight")
            raise ResourceExhausted(
                f"tenant {tenant.name!r} has {others} input bytes in flight; "
                f"{size} more would pass its limit of {cap}",
                retry_after_s=self._retry_after_s,
            )
        load.bytes = others + size

    def give_back(self, tenant: str, load: TenantLoad, requests: int, size: int) -> None:
        """Return ``requests`` and ``size`` bytes; forget the tenant once nothing of its
        is in flight (mirrored copies may outlive its requests)."""
        load.requests -= requests
        load.bytes -= size
        if load.requests == 0 and load.bytes == 0 and self._loads.get(tenant) is load:
            del self._loads[tenant]

    def load(self, tenant: str) -> TenantLoad:
        """A copy of the tenant's in-flight requests and bytes now (zero when idle)."""
        load = self._loads.get(tenant)
        return TenantLoad(load.requests, load.bytes) if load is not None else TenantLoad()
