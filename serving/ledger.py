"""The cost ledger of record: every batch's charge and its per-tenant split.

The scheduler computes each batch's charge (device ns x device share) and its
exact split by rows (``scheduler.costs``); this module makes it durable before
the batch's answers leave (the :class:`LedgerWriter` is the scheduler's
``CostSink``), records what each replica reserves (for idle capacity), and
answers finance's questions (``serving.cost_report``). Device time is integer
nanoseconds and prices integer nano-units per hour, so every figure can be
recomputed exactly from the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from scheduler import BatchRecord
from serving.config import CostsConfig
from serving.state import ledger_allocations, ledger_batches, ledger_reservations, utcnow

log = logging.getLogger(__name__)

NS_PER_HOUR = 3_600 * 10**9
NANOS = 10**9  # price units per currency unit


@dataclass(frozen=True)
class Price:
    currency: str
    nanos_per_hour: int

    def cost(self, charge_ns: int) -> float:
        """For display (spans, metrics); reports recompute exactly from the rows."""
        return charge_ns * self.nanos_per_hour / (NS_PER_HOUR * NANOS)


class Pricing:
    """Device-hour prices as of a day: exact device name, then 'cuda' for any GPU."""

    def __init__(self, config: CostsConfig) -> None:
        self.currency = config.currency
        by_device: dict[str, list[tuple[date, int]]] = defaultdict(list)
        for p in config.prices:
            by_device[p.device].append((p.since, int(p.per_hour * NANOS)))
        self._by_device = {d: sorted(v) for d, v in by_device.items()}

    def price(self, device: str, day: date) -> Price:
        for key in (device, "cuda" if device != "cpu" else None):
            if key is None or key not in self._by_device:
                continue
            in_force = [nanos for since, nanos in self._by_device[key] if since <= day]
            if in_force:
                return Price(self.currency, in_force[-1])
        return Price(self.currency, 0)


def gateway_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def as_utc(value: datetime) -> datetime:
    """SQLite hands timestamps back naive; they were written in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def from_unix_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


class _Inserts:
    """The ledger's two INSERTs as DBAPI statements for one dialect.

    The writer thread commits a transaction for every group of batches, so its cost
    is paid per batch on the gateway's GIL: through SQLAlchemy Core (compiled
    insertmanyvalues with RETURNING) a one-batch commit took 0.20-0.25 ms of CPU
    here, on the driver's cursor 0.08 ms (loadtests/README.md, "Loop turns").
    The statements are built from the table definitions, and every value passes
    through its column type's bind processor (SQLite's DATETIME text form), so the
    rows are the ones SQLAlchemy would have written.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        if dialect.paramstyle == "qmark":
            mark = "?"
        elif dialect.paramstyle in ("format", "pyformat"):
            mark = "%s"
        else:
            raise ValueError(
                f"the cost ledger needs SQLite or PostgreSQL; {dialect.name} "
                f"({dialect.driver}) uses the {dialect.paramstyle!r} parameter style"
            )
        quote = dialect.identifier_preparer.quote
        batch_cols = [c for c in ledger_batches.columns if c.name != "id"]
        self.batch_sql = (
            f"INSERT INTO {quote(ledger_batches.name)} "
            f"({', '.join(quote(c.name) for c in batch_cols)}) "
            f"VALUES ({', '.join(mark for _ in batch_cols)}) "
            f"RETURNING {quote(ledger_batches.c.id.name)}"
        )
        alloc_cols = list(ledger_allocations.columns)
        self.allocation_sql = (
            f"INSERT INTO {quote(ledger_allocations.name)} "
            f"({', '.join(quote(c.name) for c in alloc_cols)}) "
            f"VALUES ({', '.join(mark for _ in alloc_cols)})"
        )
        self._batch_binds = _binds(batch_cols, dialect)
        self._alloc_binds = _binds(alloc_cols, dialect)

    def batch_params(self, row: Mapping[str, object]) -> tuple[object, ...]:
        """A ``ledger_batches`` row by column name, as the statement's parameters."""
        return _bind(row, self._batch_binds)

    def allocation_params(self, row: Mapping[str, object]) -> tuple[object, ...]:
        return _bind(row, self._alloc_binds)


def _binds(columns: Sequence[sa.Column[Any]], dialect: sa.Dialect) -> list[tuple[str, Any]]:
    """(name, bind processor or None) per column, in the statement's order."""
    return [(c.name, c.type.dialect_impl(dialect).bind_processor(dialect)) for c in columns]


def _bind(row: Mapping[str, object], binds: Sequence[tuple[str, Any]]) -> tuple[object, ...]:
    return tuple(row[name] if p is None else p(row[name]) for name, p in binds)


class Ledger:
    """Writes batch records; one transaction per call, however many batches."""

    def __init__(self, engine: sa.Engine, pricing: Pricing, gateway: str | None = None) -> None:
        self.engine = engine
        self.pricing = pricing
        self.gateway = gateway or gateway_id()
        self._inserts = _Inserts(engine.dialect)

    def write(self, records: Sequence[BatchRecord]) -> list[list[float]]:
        """Commit the batches and their allocations; return each request's cost."""
        ins = self._inserts
        prices = []
        # A pooled connection: the pool's pre-ping (PostgreSQL) and the SQLite pragmas
        # apply as for every other connection of the engine.
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            allocations: list[tuple[object, ...]] = []
            for r in records:
                assert r.result is not None, "only batches that ran are charged"
                finished = from_unix_ns(r.finished_at_ns)
                price = self.pricing.price(r.result.device, finished.date())
                prices.append(price)
                row = {
                    "gateway": self.gateway,
                    "model": r.model,
                    "version": r.version,
                    "device": r.result.device,
                    "device_share": r.result.device_share,
                    "device_ns": r.result.device_ns,
                    "charge_ns": r.charge_ns,
                    "rows": r.rows,
                    "requests": len(r.tenants),
                    "started_at": from_unix_ns(r.started_at_ns),
                    "finished_at": finished,
                    "currency": price.currency,
                    "price_nanos_per_hour": price.nanos_per_hour,
                }
                cursor.execute(ins.batch_sql, ins.batch_params(row))
                returned = cursor.fetchone()
                assert returned is not None, "INSERT ... RETURNING gives the new id"
                batch_id = returned[0]
                allocations.extend(
                    ins.allocation_params({"batch_id": batch_id, "tenant": t, **share._asdict()})
                    for t, share in r.by_tenant.items()
                )
            cursor.executemany(ins.allocation_sql, allocations)
            cursor.close()
            connection.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                connection.rollback()
            raise
        finally:
            connection.close()  # back to the pool
        return [[p.cost(ns) for ns in r.charges_ns] for p, r in zip(prices, records, strict=True)]


class LedgerWriter:
    """The scheduler's CostSink: group commit on one writer thread.

    Every batch waits for its own commit, but batches that finish while a commit
    is running share the next one, so the commit rate stays bounded under load
    (no fsync storm) and a commit never blocks the event loop.
    """

    _STOP = object()

    def __init__(self, ledger: Ledger, max_group: int = 256) -> None:
        self.ledger = ledger
        self._max_group = max_group
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        self.commits = 0  # transactions so far (for metrics and tests)

    async def commit(self, record: BatchRecord) -> Sequence[float]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Sequence[float]] = loop.create_future()
        self._queue.put((record, future, loop))
        return await future

    def close(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items = [self._queue.get()]
            while len(items) < self._max_group:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._STOP in items:
                stopping = True
                items = [i for i in items if i is not self._STOP]
            if not items:
                continue
            work: list[
                tuple[BatchRecord, asyncio.Future[Sequence[float]], asyncio.AbstractEventLoop]
            ]
            work = items  # type: ignore[assignment]
            try:
                costs: list[list[float]] | None = self.ledger.write([w[0] for w in work])
                error: BaseException | None = None
                self.commits += 1
            except Exception as exc:  # the database is down or refused: fail these batches
                log.error("ledger commit failed for %d batch(es): %s", len(work), exc)
                costs, error = None, exc
            for i, (_, future, loop) in enumerate(work):
                loop.call_soon_threadsafe(_settle, future, costs[i] if costs else None, error)


def _settle(
    future: asyncio.Future[Sequence[float]],
    costs: Sequence[float] | None,
    error: BaseException | None,
) -> None:
    if future.done():  # the batch was cancelled (shutdown) while its commit ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert costs is not None
        future.set_result(costs)


class Reservation:
    """One replica's reserved device time: a row started at load, heartbeats, an end."""

    def __init__(
        self,
        engine: sa.Engine,
        replica: str,
        model: str,
        version: str,
        device: str,
        device_share: float,
    ) -> None:
        self._engine = engine
        self.replica = replica
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(
                ledger_reservations.insert().values(
                    replica=replica,
                    model=model,
                    version=version,
                    device=device,
                    device_share=device_share,
                    started_at=now,
                    last_seen_at=now,
                )
            )

    def beat(self) -> None:
        self._update(last_seen_at=utcnow())

    def end(self) -> None:
        now = utcnow()
        self._update(last_seen_at=now, ended_at=now)

    def _update(self, **values: datetime) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                ledger_reservations.update()
                .where(ledger_reservations.c.replica == self.replica)
                .values(**values)
            )


class Heartbeat:
    """Keeps a reservation's last_seen_at fresh from a daemon thread until stopped."""

    def __init__(self, reservation: Reservation, interval_s: float) -> None:
        self._reservation = reservation
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reservation", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._reservation.beat()
            except Exception as exc:  # a missed beat costs accuracy, not service
                log.warning("reservation heartbeat failed: %s", exc)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        try:
            self._reservation.end()
        except Exception as exc:
            log.warning("could not close reservation %s: %s", self._reservation.replica, exc)


def money(nanos_exact: Decimal) -> Decimal:
    """Costs are shown to the nano-unit."""
    return (nanos_exact / NANOS).quantize(Decimal("0.000000001"))
