"""Autoscaling on the rows replicas hold, against real Ray Serve: load through the batcher
and the direct data plane makes Serve add replicas up to max_replicas, the new ones get
batches, a trickle lets Serve stop them again down to min_replicas, no request fails on
the way, and the cost ledger's reservation rows hold the extra replica-seconds."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from ray import serve

import serving.cluster.runtime as cluster
from scheduler import BatchPolicy, ModelBatcher
from serving.cluster.reservations import ReplicaReservations
from serving.config import CostsConfig
from serving.costs import Ledger, LedgerWriter, Pricing, Reservations, build_report
from serving.dataplane import ClusterSecret, DirectBatchBackend
from serving.demo import bench_model_config
from serving.replica import deployment_name, model_deployment
from serving.replica.runner import ModelRunner
from serving.state.db import ledger_reservations, open_engine

pytestmark = pytest.mark.timeout(300)

SECRET = ClusterSecret(b"integration-cluster-secret-0123456789")
APP = "it-autoscale"
# The replicas' share of a CPU each: three of them fit the 2-CPU test machine.
SHARE = 0.5


@dataclass
class Watch:
    """What a thread beside the load sees every 0.2 s: Serve's replica states, the
    replica actors alive, and the reservation rows it keeps (the driver's job)."""

    reservations: ReplicaReservations
    dep: str
    states: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    alive: dict[str, list[float]] = field(default_factory=dict)  # id -> [first, last] seen
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                now = time.monotonic()
                status = serve.status().applications[APP].deployments[self.dep]
                states = {str(getattr(k, "value", k)): n for k, n in status.replica_states.items()}
                self.states.append((now, states))
                for replica in cluster.replica_ids(APP, self.dep):
                    self.alive.setdefault(replica, [now, now])[1] = now
                self.reservations.poll()
            except Exception as exc:  # pragma: no cover - reported by the test
                self.errors.append(exc)
            self.stop.wait(0.2)

    def running(self) -> int:
        return self.states[-1][1].get("RUNNING", 0) if self.states else 0

    def replicas(self) -> int:
        """Replicas in any state (starting, running, stopping)."""
        return sum(self.states[-1][1].values()) if self.states else 0

    def settled_at(self, running: int) -> bool:
        """Exactly ``running`` replicas, none starting or stopping."""
        return bool(self.states) and self.states[-1][1] == {"RUNNING": running}


class Forgotten(logging.Handler):
    """Counts how the gateway's data plane forgot a replica: refused as stopping, or its
    connection refused or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = 0
        self.unavailable = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.stopping += "is stopping" in message
        self.unavailable += "unavailable" in message


async def _until(check: Any, timeout_s: float) -> float:
    """Wait until ``check()``; returns when (monotonic). Fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)
    return time.monotonic()


def test_replicas_follow_the_rows_they_hold_with_no_failed_request(
    ray_serve: None, tmp_path: Path
) -> None:
    # About 10 ms of forward per full batch: the replicas, not this process, are what
    # the load waits for, so the rows it sends are held there.
    config = bench_model_config(
        tmp_path,
        num_cpus=SHARE,
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 3,
            # The heavy load (96 rows) asks for 6 replicas, the trickle (3 rows) for 1.
            "target_queued_rows_per_replica": 16,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
        },
    )
    dep = deployment_name(config)
    engine = open_engine(None, tmp_path / "state")
    pricing = Pricing(CostsConfig())
    handle = serve.run(model_deployment(config, SECRET), name=APP, route_prefix=None)
    watch = Watch(
        ReplicaReservations(
            Reservations(engine),
            0.5,
            live=cluster.replica_ids,
            ask=lambda h, calls: cluster.call_spread(h, "reservation", calls, 10.0),
        ),
        dep,
    )
    # A handle of its own: the thread's calls block, the data plane's are awaited.
    watch.reservations.watch(APP, serve.get_deployment_handle(dep, app_name=APP), dep, config)
    watcher = threading.Thread(target=watch.run, daemon=True)
    started = datetime.now(UTC)
    watcher.start()

    x = np.random.default_rng(0).random((4, 256), dtype=np.float32)
    want, _ = ModelRunner(config, num_threads=1).run({"x": x})
    answered = 0
    failures: list[BaseException] = []
    forgotten = Forgotten()
    client_log = logging.getLogger("serving.dataplane.client")
    client_log.addHandler(forgotten)
    client_log.setLevel(logging.INFO)

    async def main() -> dict[str, Any]:
        nonlocal answered
        # What the gateway's _start_batcher builds for the version.
        backend = cluster.batch_backend(handle, "direct", config.max_replicas, SECRET)
        assert isinstance(backend, DirectBatchBackend)
        ledger = LedgerWriter(Ledger(engine, pricing))
        batcher = ModelBatcher(
            config.name,
            config.version,
            backend,
            BatchPolicy(
                max_batch_size=config.max_batch_size,
                max_in_flight=config.max_replicas * config.batches_in_flight_per_replica,
                latency_lane_rows=config.latency_lane_rows,
            ),
            ledger=ledger,
        )
        batcher.start()
        heavy = asyncio.Event()
        done = asyncio.Event()

        async def caller(rows: int, always: bool) -> None:
            nonlocal answered
            while not done.is_set():
                if not (always or heavy.is_set()):
                    await asyncio.sleep(0.05)
                    continue
                try:
                    out = await batcher.submit("t", {"x": x[:rows]}, rows, timeout_s=30)
                    np.testing.assert_allclose(out["y"], want["y"][:rows], rtol=1e-4, atol=1e-5)
                    answered += 1
                except Exception as exc:
                    failures.append(exc)

        # A trickle that never stops: three 1-row callers, under one replica's target
        # in total, yet spread over every replica (each batch goes to the one with the
        # fewest in flight), so the replicas that stop are sent batches while they stop.
        callers = [asyncio.create_task(caller(1, always=True)) for _ in range(3)]
        callers += [asyncio.create_task(caller(4, always=False)) for _ in range(24)]
        await _until(lambda: watch.settled_at(1), 60)
        heavy.set()
        load_at = time.monotonic()
        decided_at = await _until(lambda: watch.replicas() > 1, 60)
        up_at = await _until(lambda: watch.running() == 3, 60)
        # The replicas Serve added get batches once discovered.
        await _until(lambda: len(backend.answered) == 3 and min(backend.answered.values()) > 0, 20)
        heavy.clear()  # the trickle goes on through the scale-down
        calm_at = time.monotonic()
        down_at = await _until(lambda: watch.settled_at(1), 60)
        await asyncio.sleep(1.0)  # a last round of the trickle on the one left
        done.set()
        await asyncio.gather(*callers)
        left = backend.addresses
        await batcher.close()
        await asyncio.to_thread(ledger.close)
        return {
            "upscale_decided_s": round(decided_at - load_at, 1),
            "scale_up_s": round(up_at - load_at, 1),
            "scale_down_s": round(down_at - calm_at, 1),
            "left": left,
        }

    try:
        figures = asyncio.run(main())
    finally:
        client_log.removeHandler(forgotten)
        watch.stop.set()
        watcher.join(10)
        serve.delete(APP)
    ended = datetime.now(UTC)
    watch.reservations.poll(force=True)
    watch.reservations.close()

    print(
        f"\nautoscaling: {figures}, {answered} requests answered, {len(failures)} failed; "
        f"replicas forgotten: {forgotten.stopping} refused as stopping, "
        f"{forgotten.unavailable} connection refused or closed"
    )
    assert not watch.errors, watch.errors[:3]
    assert not failures, failures[:3]
    assert answered > 100
    # The two replicas Serve stopped were sent batches as they stopped, and forgotten.
    assert len(figures["left"]) == 1
    assert forgotten.stopping + forgotten.unavailable >= 2

    # The ledger's rows: the replica that stayed, and those Serve added, each from its
    # load until it was last seen alive (at most one heartbeat before it was gone). A
    # replica Serve stopped before it loaded (the decision changed while it started)
    # reserved nothing the ledger counts.
    with engine.connect() as conn:
        rows = {r.replica.split(":")[-1]: r for r in conn.execute(sa.select(ledger_reservations))}
    t0 = watch.states[0][0]
    changes = [
        (round(t - t0, 1), st)
        for i, (t, st) in enumerate(watch.states)
        if i == 0 or st != watch.states[i - 1][1]
    ]
    print(f"replica states: {changes}")
    assert set(rows) <= set(watch.alive), (set(rows), set(watch.alive))
    assert all(r.device_share == SHARE and r.ended_at is not None for r in rows.values())

    def seconds(r: Any) -> float:
        return (_utc(r.ended_at) - _utc(r.started_at)).total_seconds()

    first = min(rows, key=lambda k: watch.alive[k][0])
    added = [k for k in rows if k != first]
    assert len(added) >= 2, rows
    for key in added:
        lived = watch.alive[key][1] - watch.alive[key][0]  # actor alive, load included
        assert 0 < seconds(rows[key]) <= lived + 1.0, (seconds(rows[key]), lived)
    # Three running replicas for a while: two added ones were reserved at least that long.
    at_three = sum(
        b[0] - a[0]
        for a, b in zip(watch.states, watch.states[1:], strict=False)
        if a[1].get("RUNNING", 0) >= 3
    )
    longest = sorted((seconds(rows[k]) for k in added), reverse=True)[:2]
    assert min(longest) >= at_three - 0.5, (at_three, longest)

    # Finance's idle-capacity report counts them: reserved = used + idle, and more than
    # one replica's worth over the test.
    report = build_report(
        engine,
        pricing,
        start=started - timedelta(minutes=1),
        end=ended + timedelta(minutes=1),
        group_by=["tenant"],
        now=ended,
    )
    one_replica_ns = SHARE * (ended - started).total_seconds() * 1e9
    extra_ns = sum(SHARE * seconds(rows[k]) * 1e9 for k in added)
    assert report.reserved_ns > one_replica_ns
    assert abs(report.reserved_ns - (one_replica_ns + extra_ns)) < SHARE * 10e9
    assert report.total.used_ns > 0
    assert report.total.used_ns + report.total.idle_ns == report.reserved_ns
    print(
        f"reserved {report.reserved_ns / 1e9:.1f} CPU-s, of which the added replicas "
        f"{extra_ns / 1e9:.1f}, used {report.total.used_ns / 1e9:.3f}"
    )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
