"""Live deploys: keep Ray Serve and the gateway in step with the registry's stages.

Runs in the ``gpugate serve`` driver. Every version in staging or production is
a Serve application of its own (``gpugate-<model>-<version>``), so versions are
added and removed without touching the gateway's application. One
:meth:`Deployer.reconcile` pass:

1. deploys the applications of versions that entered staging or production and
   waits until they run (a version that fails to deploy is audited and skipped;
   if it was meant to be production, the version serving now stays);
2. hands the gateway the new set (``Gateway.sync_models``), which swaps its
   model table at once and drains the batchers of versions that left;
3. deletes the applications of those versions, whose queues are now empty.

So a promotion moves traffic with no failed request: the new version is up
before any request is routed to it, and the old one is removed only after the
last request routed to it has finished.

The deployer also keeps the replicas' reservation rows of the cost ledger
(serving.cluster.reservations): the replicas get the model's config and the
cluster secret, no database URL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import serving.cluster.runtime as cluster
from serving.cluster.reservations import ReplicaReservations
from serving.config import ModelConfig
from serving.costs import Reservations
from serving.dataplane import ClusterSecret
from serving.registry import Registry
from serving.replica import deployment_name, model_deployment
from serving.state import audit

log = logging.getLogger(__name__)

SERVED_STAGES = ("staging", "production")
# Even when nothing changed, re-send the set now and then: a gateway replica that Ray
# started or restarted starts with no models, and is not ready until it has them.
RESYNC_S = 1.0
# How long a round of reservation calls may wait for the replicas' answers.
_ASK_TIMEOUT_S = 10.0

Key = tuple[str, str]


def app_name(name: str, version: str) -> str:
    return f"{cluster.APP_NAME}-{name}-{version}"


@dataclass(frozen=True)
class Wanted:
    config: ModelConfig
    stage: str
    registered_at: datetime | None = None  # no replica of it can have loaded before

    @property
    def app(self) -> str:
        return app_name(self.config.name, self.config.version)

    def as_spec(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json"), "stage": self.stage, "app": self.app}


class Deployer:
    def __init__(
        self,
        registry: Registry,
        secret: ClusterSecret,
        *,
        heartbeat_s: float = 5.0,
        deploy_timeout_s: float = 180.0,
    ) -> None:
        self.registry = registry
        self._secret = secret
        self._timeout = deploy_timeout_s
        self.reservations = ReplicaReservations(
            Reservations(registry.engine),
            heartbeat_s,
            live=cluster.replica_ids,
            ask=lambda handle, calls: cluster.call_spread(
                handle, "reservation", calls, _ASK_TIMEOUT_S
            ),
        )
        self._deployed: dict[Key, Wanted] = {}
        self._failed: set[tuple[str, str, str]] = set()  # (name, version, sha256)
        self._sent: list[dict[str, Any]] | None = None
        self._current: list[dict[str, Any]] | None = None
        self._sent_at = 0.0

    def desired(self) -> dict[Key, Wanted]:
        return {
            (row.name, row.version): Wanted(
                self.registry.model_config(row), row.stage, row.created_at
            )
            for row in self.registry.list()
            if row.stage in SERVED_STAGES
        }

    def prepare(self) -> list[dict[str, Any]]:
        """Deploy what the registry wants served; returns the gateway's first model set."""
        live = self._deploy_missing(self.desired())
        self._sent, self._sent_at = [w.as_spec() for w in live.values()], time.monotonic()
        self.reservations.poll(force=True)
        return self._sent

    def reconcile(self, gateway: Any) -> bool:
        """One pass; True if the gateway's set changed."""
        self.reservations.poll()  # first: a pass that fails below must not starve it
        deployed = set(self._deployed)
        live = self._deploy_missing(self.desired())
        if set(self._deployed) - deployed:
            # New replicas reserve from now: their rows are written before the gateways
            # are sent the set (and before `serve` says it is ready).
            self.reservations.poll(force=True)
        spec = [w.as_spec() for w in live.values()]
        # What a gateway that starts now should serve: it asks for it before its ports
        # open, while the broadcast below may be waiting for it to finish starting.
        self._current = spec
        changed = spec != self._sent
        if changed or time.monotonic() - self._sent_at > RESYNC_S:
            # Every gateway replica, each of which drains the versions that left before
            # it answers: only then are their applications deleted below.
            served = cluster.broadcast(gateway, "sync_models", spec, timeout_s=self._timeout)
            if changed:
                sets = {", ".join(s) or "nothing" for s in served}
                log.warning("gateways now serve %s", " | ".join(sorted(sets)))
            self._sent, self._sent_at = spec, time.monotonic()
        for key in [k for k in self._deployed if k not in live]:
            gone = self._deployed.pop(key)
            cluster.delete(gone.app)
            self.reservations.unwatch(gone.app)
        return changed

    def current(self) -> list[dict[str, Any]] | None:
        """The set the gateways are to serve, as of the last pass (None before the first
        pass has deployed it)."""
        return self._current

    def served(self) -> list[str]:
        """What the gateways were last sent: ``name:version:stage`` each."""
        return sorted(
            f"{m['config']['name']}:{m['config']['version']}:{m['stage']}" for m in self._sent or []
        )

    def close(self) -> None:
        """The driver is stopping and its applications with it: end the reservations."""
        self.reservations.close()

    def _deploy_missing(self, wanted: dict[Key, Wanted]) -> dict[Key, Wanted]:
        """Deploy new versions; returns the versions that are up and should be served."""
        live: dict[Key, Wanted] = {}
        for key, w in sorted(wanted.items()):
            running = self._deployed.get(key)
            if running is not None and running.config == w.config:
                live[key] = w
                continue
            marker = (key[0], key[1], w.config.sha256 or "")
            if marker in self._failed:
                continue
            try:
                handle = cluster.deploy(
                    model_deployment(w.config, self._secret), self._timeout, w.app
                )
            except (RuntimeError, TimeoutError) as exc:
                self._failed.add(marker)
                log.error("deploy of %s:%s failed: %s", key[0], key[1], exc)
                audit.append(
                    self.registry.engine,
                    "system",
                    "model.deploy_failed",
                    f"model:{key[0]}:{key[1]}",
                    after={"stage": w.stage},
                    reason=str(exc)[:2000],
                )
                cluster.delete(w.app)
                continue
            self._deployed[key] = w
            live[key] = w
            self.reservations.watch(
                w.app, handle, deployment_name(w.config), w.config, not_before=w.registered_at
            )
        # A model whose new production version could not be deployed keeps the one
        # serving now rather than going dark.
        producing = {k[0] for k, w in live.items() if w.stage == "production"}
        for key, w in self._deployed.items():
            if key not in live and w.stage == "production" and key[0] not in producing:
                live[key] = w
                producing.add(key[0])
        return live
