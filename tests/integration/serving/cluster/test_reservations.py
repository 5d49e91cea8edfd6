"""The driver keeps the replicas' reservation rows (the replicas hold no database URL):
rows for replicas Ray lists as alive, seen while alive, ended when gone, and the
idle-capacity report reads them as before. Ray is replaced by fakes here (the list of
live replicas, their answers); the databases are real, SQLite and PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from serving.cluster.reservations import ReplicaReservations
from serving.config.schema import CostsConfig, ModelConfig, TensorConfig
from serving.costs import Pricing, Reservations, build_report
from serving.state.db import ledger_reservations


class FakeServe:
    """Which replicas of a deployment are alive (Ray's list) and what each answers."""

    def __init__(self) -> None:
        self.alive: dict[str, dict[str, Any]] = {}
        self.asked = 0
        self.answering = True  # False: loading, or Serve routed every call elsewhere

    def live(self, app: str, deployment: str) -> set[str]:
        assert (app, deployment) == ("gpugate-digits-1", "model-digits-1")
        return set(self.alive)

    def ask(self, handle: Any, calls: int) -> list[dict[str, Any]]:
        assert handle == "handle"
        self.asked += 1
        if not self.answering:
            return []
        return [dict(answer, replica=r) for r, answer in self.alive.items()]

    def start(self, replica: str, loaded_at: float) -> None:
        self.alive[replica] = {"device": "cpu", "device_share": 2.0, "loaded_at": loaded_at}


def _rows(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.replica: r for r in conn.execute(sa.select(ledger_reservations))}


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _config(**fields: Any) -> ModelConfig:
    x = [TensorConfig(name="x", datatype="FP32", shape=[4])]
    y = [TensorConfig(name="y", datatype="FP32", shape=[4])]
    values: dict[str, Any] = {"name": "digits", "version": "1", "artifact": "/nonexistent"}
    values["format"] = "torchscript"
    values.update(inputs=x, outputs=y, num_cpus=2.0, **fields)
    return ModelConfig(**values)


def _watching(
    engine: sa.Engine, serve: FakeServe, not_before: datetime | None = None, **config: Any
) -> ReplicaReservations:
    watch = ReplicaReservations(Reservations(engine), 3600.0, live=serve.live, ask=serve.ask)
    watch.watch(
        "gpugate-digits-1", "handle", "model-digits-1", _config(**config), not_before=not_before
    )
    return watch


def test_what_a_replica_says_of_itself_is_bounded(engine: sa.Engine) -> None:
    """Model code answers the reservation call: a share of 1e9, a load time of 1970 or in
    the future, or a GPU's label on a CPU version must not reach finance's report."""
    serve = FakeServe()
    registered = datetime.now(UTC) - timedelta(hours=1)
    serve.alive["early"] = {"device": "cpu", "device_share": 1e9, "loaded_at": 0.0}
    serve.alive["later"] = {"device": "cpu", "device_share": 2.0, "loaded_at": time.time() + 1e6}
    serve.alive["nan"] = {"device": "cpu", "device_share": 2.0, "loaded_at": float("nan")}
    serve.alive["gpu"] = {"device": "NVIDIA H100", "device_share": 8.0, "loaded_at": time.time()}
    watch = _watching(engine, serve, not_before=registered)
    watch.poll(force=True)
    rows = _rows(engine)
    assert set(rows) == {"model-digits-1:early", "model-digits-1:later"}  # nan, gpu refused
    early, later = rows["model-digits-1:early"], rows["model-digits-1:later"]
    assert (early.device, early.device_share) == ("cpu", 2.0)  # the config's num_cpus
    assert abs(_utc(early.started_at).timestamp() - registered.timestamp()) < 1
    assert _utc(later.started_at) <= datetime.now(UTC)
    # A version that reserves GPUs may name its GPU; the share is its num_gpus.
    serve.alive = {"gpu": serve.alive["gpu"]}
    gpu = _watching(engine, serve, num_gpus=0.5)
    gpu.poll(force=True)
    row = _rows(engine)["model-digits-1:gpu"]
    assert (row.device, row.device_share) == ("NVIDIA H100", 0.5)


def test_rows_open_for_live_replicas_and_end_at_their_last_sighting(engine: sa.Engine) -> None:
    serve = FakeServe()
    loaded = time.time() - 30
    serve.start("aaaa", loaded)
    watch = _watching(engine, serve)
    watch.poll(force=True)
    row = _rows(engine)["model-digits-1:aaaa"]
    # Started when the replica had loaded, not when the driver first saw it.
    assert abs(_utc(row.started_at).timestamp() - loaded) < 1
    assert (row.model, row.version, row.device, row.device_share) == ("digits", "1", "cpu", 2.0)
    assert row.ended_at is None
    first_seen = _utc(row.last_seen_at)

    watch.poll()  # within the interval: nothing
    assert _utc(_rows(engine)["model-digits-1:aaaa"].last_seen_at) == first_seen
    time.sleep(0.05)
    watch.poll(force=True)
    seen_again = _utc(_rows(engine)["model-digits-1:aaaa"].last_seen_at)
    assert seen_again > first_seen
    assert serve.asked == 1  # a replica already known is not asked again

    # Killed: Ray no longer lists it; Serve starts another in its place.
    del serve.alive["aaaa"]
    serve.start("bbbb", time.time())
    time.sleep(0.05)
    watch.poll(force=True)
    rows = _rows(engine)
    assert _utc(rows["model-digits-1:aaaa"].ended_at) == seen_again  # reserved until seen
    assert rows["model-digits-1:bbbb"].ended_at is None

    # The deployer removes the version: the rest end at once.
    watch.unwatch("gpugate-digits-1")
    assert _rows(engine)["model-digits-1:bbbb"].ended_at is not None
    watch.poll(force=True)  # no longer watched: nothing more is written
    assert len(_rows(engine)) == 2


def test_a_replica_loading_or_missed_by_serve_is_asked_again_next_round(
    engine: sa.Engine,
) -> None:
    serve = FakeServe()
    serve.start("aaaa", time.time())
    watch = _watching(engine, serve)
    serve.answering = False
    watch.poll(force=True)
    assert _rows(engine) == {}
    serve.answering = True
    watch.poll(force=True)
    assert set(_rows(engine)) == {"model-digits-1:aaaa"}


def test_a_restarted_driver_takes_over_the_rows_and_reopens_one_it_ended(
    open_db: Any,
) -> None:
    serve = FakeServe()
    serve.start("aaaa", time.time() - 10)
    first = open_db()
    old = _watching(first, serve)
    old.poll(force=True)
    old.close()  # e.g. a driver stopping while a new one already runs
    assert _rows(first)["model-digits-1:aaaa"].ended_at is not None
    new = _watching(open_db(), serve)
    new.poll(force=True)
    row = _rows(first)["model-digits-1:aaaa"]
    assert row.ended_at is None  # alive after all: reserved on
    assert len(_rows(first)) == 1


def test_the_idle_report_reads_the_drivers_rows(engine: sa.Engine) -> None:
    serve = FakeServe()
    serve.start("aaaa", time.time() - 20)
    watch = _watching(engine, serve)
    watch.poll(force=True)
    now = datetime.now(UTC)
    report = build_report(
        engine,
        Pricing(CostsConfig()),
        start=now - timedelta(hours=1),
        end=now + timedelta(hours=1),
        group_by=["tenant"],
    )
    # Live replica: reserved from its load until now, times its share of 2 CPUs, and
    # with no traffic all of it idle.
    assert 2 * 19e9 < report.reserved_ns < 2 * 60e9
    assert report.total.idle_ns == report.reserved_ns
