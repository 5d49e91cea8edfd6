"""The replicas' reservations in the cost ledger, written by the ``gpugate serve`` driver.

Replicas run model code, so they hold no database credentials; the driver, which
deploys them, keeps their rows instead (serving.costs.Reservations). Every
``interval_s`` it lists each watched deployment's live replicas from Ray (their
actors), asks the ones it has not met yet what they reserve (a Serve handle call:
device and share are known only where the model loaded), moves ``last_seen_at`` of
those alive, and ends the rows of those gone at their last sighting. A version the
deployer removes is ended at once.

The list of live replicas is Ray's, not the replicas' word: a replica that hangs still
holds its device and is still counted, one that died is not. What a replica says of
itself is model code's word, so it is bounded before it reaches finance's report: the
share is the config's (``num_gpus`` on a GPU, ``num_cpus`` on the CPU), the device label
is ``cpu`` unless the version reserves GPUs (then printable, at most 128 characters), and
the load time lies between the version's registration and now.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from serving.config import ModelConfig
from serving.costs import Reservations
from serving.state import utcnow

log = logging.getLogger(__name__)

# A replica's answer to ``ModelReplica.reservation``.
Identity = dict[str, Any]
LiveReplicas = Callable[[str, str], set[str]]  # (app, deployment) -> Serve replica ids
AskReplicas = Callable[[Any, int], list[Identity]]  # (handle, calls) -> answers
_GPU_LABEL = re.compile(r"[\x20-\x7e]{1,128}")


@dataclass
class _Watched:
    handle: Any
    deployment: str
    config: ModelConfig
    not_before: datetime | None
    seen: dict[str, datetime] = field(default_factory=dict)  # replica id -> last sighting

    def row(self, replica_id: str) -> str:
        return f"{self.deployment}:{replica_id}"

    def reservation(self, answer: Identity, now: datetime) -> tuple[str, float, datetime]:
        """(device, share, loaded) from a replica's answer, bounded as the module says;
        ValueError for an answer that cannot be right."""
        device = str(answer["device"])
        if device != "cpu" and not (self.config.num_gpus > 0 and _GPU_LABEL.fullmatch(device)):
            raise ValueError(f"device label {device[:64]!r} for a version reserving no GPU")
        share = self.config.num_cpus if device == "cpu" else self.config.num_gpus
        loaded_s = float(answer["loaded_at"])
        if not math.isfinite(loaded_s):
            raise ValueError(f"load time {loaded_s}")
        loaded = min(datetime.fromtimestamp(min(max(loaded_s, 0.0), 1e11), UTC), now)
        if self.not_before is not None:
            loaded = max(loaded, self.not_before.astimezone(UTC))
        return device, share, loaded


class ReplicaReservations:
    """Keeps one reservation row per live replica of each watched model version."""

    def __init__(
        self,
        reservations: Reservations,
        interval_s: float,
        *,
        live: LiveReplicas,
        ask: AskReplicas,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rows = reservations
        self._interval_s = interval_s
        self._live = live
        self._ask = ask
        self._clock = clock
        self._watched: dict[str, _Watched] = {}
        self._polled_at = -float("inf")

    def watch(
        self,
        app: str,
        handle: Any,
        deployment: str,
        config: ModelConfig,
        *,
        not_before: datetime | None = None,
    ) -> None:
        """Follow the replicas of ``app`` (deployed again: the rows it has stay); none of
        them loaded before ``not_before`` (the version's registration)."""
        known = self._watched.get(app)
        watched = _Watched(handle, deployment, config, not_before)
        if known is not None:
            watched.seen = known.seen
        self._watched[app] = watched

    def unwatch(self, app: str) -> None:
        """``app`` was removed (its replicas are gone): end its rows now."""
        watched = self._watched.pop(app, None)
        if watched is None:
            return
        now = utcnow()
        try:
            for replica_id in list(watched.seen):
                self._end(watched, replica_id, now)
        except Exception as exc:  # left open, they count until their last sighting
            log.warning("could not end the reservations of %s: %s", app, exc)

    def close(self) -> None:
        for app in list(self._watched):
            self.unwatch(app)

    def poll(self, force: bool = False) -> None:
        """One round, if ``interval_s`` has passed since the last (or ``force``)."""
        if not force and self._clock() - self._polled_at < self._interval_s:
            return
        self._polled_at = self._clock()
        for app, watched in list(self._watched.items()):
            try:
                self._round(app, watched)
            except Exception as exc:  # a missed round costs accuracy, not service
                log.warning("reservations of %s: %s", app, exc)

    def _round(self, app: str, watched: _Watched) -> None:
        live = self._live(app, watched.deployment)
        now = utcnow()
        if live - watched.seen.keys():
            # Serve spreads concurrent calls over the replicas; a replica missed now
            # (or still loading) is asked again next round.
            for answer in self._ask(watched.handle, 2 * len(live)):
                replica_id = str(answer["replica"])
                if replica_id in live and replica_id not in watched.seen:
                    try:
                        device, share, loaded = watched.reservation(answer, now)
                    except (KeyError, TypeError, ValueError, OverflowError) as exc:
                        log.warning("replica %s of %s: bad reservation: %s", replica_id, app, exc)
                        continue
                    self._rows.open(
                        watched.row(replica_id),
                        watched.config.name,
                        watched.config.version,
                        device,
                        share,
                        started_at=loaded,
                    )
                    watched.seen[replica_id] = now
        alive = [r for r in watched.seen if r in live]
        self._rows.seen([watched.row(r) for r in alive], now)
        for replica_id in alive:
            watched.seen[replica_id] = now
        for replica_id in [r for r in watched.seen if r not in live]:
            # Gone since the last round (killed, restarted, scaled down): reserved
            # until it was last seen alive.
            self._end(watched, replica_id, watched.seen[replica_id])

    def _end(self, watched: _Watched, replica_id: str, at: datetime) -> None:
        self._rows.end(watched.row(replica_id), at)
        del watched.seen[replica_id]
