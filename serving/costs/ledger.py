"""The cost ledger of record: every batch's charge and its per-tenant split.

The scheduler computes each batch's charge (device ns x device share) and its
exact split by rows (``scheduler.costs``); this module makes it durable before
the batch's answers leave (the :class:`LedgerWriter` is the scheduler's
``CostSink``), records what each replica reserves (for idle capacity), and
answers finance's questions (``serving.costs.report``). Device time is integer
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
import sqlite3
import threading
import time
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
    is paid per batch on the gateway's GIL: the driver's cursor costs a fraction of
    a commit through SQLAlchemy Core's compiled insertmanyvalues with RETURNING.
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
        # A pooled connection: the pool's pre-ping (PostgreSQL) and the SQLite pragmas
        # apply as for every other connection of the engine.
        connection = self.engine.raw_connection()
        try:
            return self.write_on(connection, records)
        finally:
            connection.close()  # back to the pool

    def write_on(self, connection: Any, records: Sequence[BatchRecord]) -> list[list[float]]:
        """:meth:`write` on a DBAPI connection the caller holds; rolled back on error."""
        ins = self._inserts
        prices = []
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
        return [[p.cost(ns) for ns in r.charges_ns] for p, r in zip(prices, records, strict=True)]


def _inline_by_default(engine: sa.Engine) -> bool:
    """Inline commits only where a commit is no fsync: SQLite with synchronous NORMAL."""
    if engine.dialect.name != "sqlite":
        return False
    with engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # 1: NORMAL


class LedgerWriter:
    """The scheduler's CostSink: a batch's answers wait for its commit.

    Two paths. On SQLite with ``synchronous = NORMAL`` a batch is committed inline, on
    the event loop, when the file's write lock is free: a WAL append without fsync,
    with no thread hop: through the writer thread, the
    same commit would wait for the GIL at each ``sqlite3`` call beside a heavy
    tenant, and hop back to the loop. The inline connection never waits for the lock
    (``busy_timeout = 0``) and never checkpoints (that fsyncs). When another writer
    holds the lock (the CLI, another gateway worker), the batch goes to the
    thread instead, and the thread runs the WAL checkpoints.

    On PostgreSQL, and on SQLite with ``synchronous = FULL`` (on request: a commit
    fsyncs, so it survives a power cut), every batch goes to the writer thread (a
    commit there is an fsync, locally or on the server, which must not block the
    loop). Batches that finish while a commit is running share the next one (group
    commit), so the commit rate stays bounded under load; loadtests/ledger_durability.py
    measures what FULL costs.
    """

    _STOP = object()

    def __init__(
        self,
        ledger: Ledger,
        max_group: int = 256,
        *,
        inline: bool | None = None,
        checkpoint_every_s: float = 1.0,
    ) -> None:
        self.ledger = ledger
        self._max_group = max_group
        self._inline = _inline_by_default(ledger.engine) if inline is None else inline
        if self._inline and ledger.engine.dialect.name != "sqlite":
            raise ValueError("inline ledger commits are for SQLite only")
        self._inline_connection: Any = None
        self._checkpoint_every_s = checkpoint_every_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        # Counters (tests, ledger_bench.py): transactions on the thread, inline commits,
        # inline attempts that found the file locked, WAL checkpoints run by the thread.
        self.commits = 0
        self.inline_commits = 0
        self.inline_busy = 0
        self.checkpoints = 0

    async def commit(self, record: BatchRecord) -> Sequence[float]:
        if self._inline:
            costs = self._commit_inline(record)
            if costs is not None:
                return costs  # committed without leaving this step of the caller
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Sequence[float]] = loop.create_future()
        self._queue.put((record, future, loop))
        return await future

    def _commit_inline(self, record: BatchRecord) -> list[float] | None:
        """The batch's costs once committed, or None when the file is locked."""
        connection = self._inline_connection
        if connection is None:
            connection = self._inline_connection = self._open_inline()
        try:
            costs = self.ledger.write_on(connection, [record])[0]
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            ):
                raise
            self.inline_busy += 1
            return None
        self.inline_commits += 1
        return costs

    def _open_inline(self) -> Any:
        # Out of the pool: this connection belongs to the loop for the writer's life.
        connection = self.ledger.engine.raw_connection()
        connection.detach()
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 0")  # a locked file: the thread waits
            cursor.execute("PRAGMA wal_autocheckpoint = 0")  # the thread checkpoints
        finally:
            cursor.close()
        return connection

    def close(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, checkpoint, then stop the thread."""
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        if self._inline_connection is not None:
            with contextlib.suppress(Exception):
                self._inline_connection.close()
            self._inline_connection = None

    def _run(self) -> None:
        stopping = False
        checkpointed_at, checkpointed_commits = time.monotonic(), 0
        wait = self._checkpoint_every_s if self._inline else None
        while not stopping:
            try:
                items = [self._queue.get(timeout=wait)]
            except queue.Empty:
                items = []
            while items and len(items) < self._max_group:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._STOP in items:
                stopping = True
                items = [i for i in items if i is not self._STOP]
            if items:
                self._write_group(items)
            if not self._inline or self.inline_commits == checkpointed_commits:
                continue  # nothing new in the WAL from the inline path
            if stopping or time.monotonic() - checkpointed_at >= self._checkpoint_every_s:
                checkpointed_commits = self.inline_commits
                self._checkpoint()
                checkpointed_at = time.monotonic()

    def _write_group(self, items: list[object]) -> None:
        work: list[tuple[BatchRecord, asyncio.Future[Sequence[float]], asyncio.AbstractEventLoop]]
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

    def _checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database file (PASSIVE: it waits
        for no reader or writer, and the inline commits go on meanwhile)."""
        try:
            connection = self.ledger.engine.raw_connection()
            try:
                connection.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                connection.close()
            self.checkpoints += 1
        except Exception as exc:  # retried after the next interval
            log.warning("ledger WAL checkpoint failed: %s", exc)


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


class Reservations:
    """What each model replica reserves while it is up: one row per replica, started
    when it had loaded, its ``last_seen_at`` moved while it lives, ended when it is gone.

    Written by whoever watches the replicas (the ``gpugate serve`` driver,
    serving.cluster.reservations), never by the replicas: a process that runs model
    code holds no database credentials.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def open(
        self,
        replica: str,
        model: str,
        version: str,
        device: str,
        device_share: float,
        started_at: datetime,
    ) -> None:
        """A row for a replica first seen now; one already there (a watcher that
        restarted) is seen again instead."""
        now = utcnow()
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    ledger_reservations.insert().values(
                        replica=replica,
                        model=model,
                        version=version,
                        device=device,
                        device_share=device_share,
                        started_at=min(started_at, now),
                        last_seen_at=now,
                    )
                )
        except sa.exc.IntegrityError:
            with self._engine.begin() as conn:
                conn.execute(
                    ledger_reservations.update()
                    .where(ledger_reservations.c.replica == replica)
                    .values(last_seen_at=now, ended_at=None)
                )

    def seen(self, replicas: Sequence[str], at: datetime) -> None:
        """The replicas were alive at ``at``."""
        if replicas:
            with self._engine.begin() as conn:
                conn.execute(
                    ledger_reservations.update()
                    .where(ledger_reservations.c.replica.in_(list(replicas)))
                    .values(last_seen_at=at)
                )

    def end(self, replica: str, at: datetime) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                ledger_reservations.update()
                .where(
                    ledger_reservations.c.replica == replica,
                    ledger_reservations.c.ended_at.is_(None),
                )
                .values(last_seen_at=at, ended_at=at)
            )


def money(nanos_exact: Decimal) -> Decimal:
    """Costs are shown to the nano-unit."""
    return (nanos_exact / NANOS).quantize(Decimal("0.000000001"))
