"""The control loop as a Ray Serve deployment, so that serving outlives whoever deployed it.

One replica of :class:`Control` is the ingress of the ``gpugate`` application, beside
the gateway deployment it holds a handle to. It runs :class:`~serving.cluster.Deployer`'s
reconcile pass every ``interval_s``: it deploys the applications of the versions the
registry wants served, sends the set to every gateway, removes what left, and keeps
the replicas' reservation rows. Serve restarts it if it dies; a restarted one starts
from the registry and the applications that run, so nothing that serves depends on
the process that deployed it (``gpugate serve``, ``gpugate deploy``, ``serve deploy``
or a RayService).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from serving.budgets import BudgetMonitor, BudgetStore
from serving.cluster.deployer import Deployer
from serving.cluster.runtime import check_state_host
from serving.config import GatewayConfig
from serving.costs import Pricing
from serving.dataplane import ClusterSecret
from serving.registry import Registry
from serving.state import audit, open_engine

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 0.25


class Control:
    """Follows the registry (what is deployed, and what the gateways serve) and the
    tenants' budgets (serving.budgets: one monitor per deployment)."""

    async def __init__(  # type: ignore[misc]  # Ray Serve supports async constructors
        self,
        gateway: DeploymentHandle,
        config: dict[str, Any],
        state_dir: str,
        database_url: str | None,
        secret: ClusterSecret,
        interval_s: float = RECONCILE_INTERVAL_S,
        state_host: str | None = None,
    ) -> None:
        check_state_host(database_url, state_host)
        registry_config = GatewayConfig.model_validate(config)
        engine = open_engine(database_url, Path(state_dir))
        audit.configure(engine, Path(state_dir), **registry_config.audit.model_dump())
        self._deployer = Deployer(
            Registry(engine, Path(state_dir), registry_config),
            secret,
            heartbeat_s=registry_config.costs.reservation_heartbeat_s,
        )
        self._budgets = BudgetMonitor(BudgetStore(engine, Pricing(registry_config.costs)))
        self._budget_task = asyncio.get_running_loop().create_task(
            self._budgets.run(registry_config.costs.budget_check_s), name="gpugate-budgets"
        )
        self._gateway = gateway
        self._interval_s = interval_s
        self._passes = 0  # reconcile passes that completed
        self._last_error = ""
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gpugate-control")

    async def _run(self) -> None:
        failing = False
        while not self._stopped:
            try:
                # Blocking Serve and database calls: off the replica's event loop.
                await asyncio.to_thread(self._deployer.reconcile, self._gateway)
            except Exception as exc:  # keep serving what runs; try again next pass
                self._last_error = str(exc)[:2000]
                if not failing:
                    log.exception("reconcile failed; retrying every %ss", self._interval_s)
                failing = True
            else:
                if failing:
                    log.warning("reconcile recovered")
                failing, self._last_error = False, ""
                self._passes += 1
            await asyncio.sleep(self._interval_s)

    def models(self) -> list[dict[str, Any]] | None:
        """The model set the gateways serve (None until the first pass): a gateway that
        starts asks for it before it opens its ports."""
        return self._deployer.current()

    def status(self) -> dict[str, Any]:
        """Passes completed, what the gateways were last sent, and the last failure."""
        return {
            "passes": self._passes,
            "served": self._deployer.served(),
            "error": self._last_error,
            "at": time.time(),
        }

    async def stop(self) -> dict[str, Any]:
        """Stop following the registry (the deployer's drain is next), and end the
        replicas' reservations: their applications are about to be removed."""
        self._stopped = True
        self._task.cancel()
        self._budget_task.cancel()
        await asyncio.gather(self._task, self._budget_task, return_exceptions=True)
        await self._budgets.close()
        await asyncio.to_thread(self._deployer.close)
        return self.status()

    def check_health(self) -> None:
        """Serve's health probe: a loop that ended on its own restarts the replica."""
        if (self._task.done() or self._budget_task.done()) and not self._stopped:
            raise RuntimeError("the control loop ended")
