"""The tamper-evident audit log: an append-only hash chain in the state database.

Every record carries the sha256 of the previous record and its own hash over a
canonical encoding of all its fields, so editing, inserting or removing a row
breaks the chain at that row. ``audit_head`` holds the last sequence number and
hash: every append starts by locking that row (a row lock on PostgreSQL, the
database write lock on SQLite), so concurrent CLI calls and the gateway append
one after another and never fork the chain, and removing the newest records is
noticed as well.

Actions write their own rows and the audit record in the same transaction
(:func:`audited`), so a change is never committed without its record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from serving.state.db import audit_head as t_head
from serving.state.db import audit_log as t_log
from serving.state.db import utcnow

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    reason: str
    prev_hash: str
    hash: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "before": self.before,
            "after": self.after,
            "reason": self.reason,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def canonical(value: Any) -> str:
    """The one JSON encoding that is hashed and stored (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _aware(ts: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were written as UTC.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def record_hash(
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    before: str,
    after: str,
    reason: str,
    prev_hash: str,
) -> str:
    body = canonical(
        [seq, _aware(at).isoformat(), actor, action, target, before, after, reason, prev_hash]
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class Audit:
    """Appends to and reads the chain through one connection's transaction."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self._locked = False

    def lock(self) -> None:
        """Take the chain's write lock; the first statement of an audited transaction.

        Writing first matters on SQLite: a transaction that reads before it writes
        can find its snapshot stale at the write and fail instead of waiting.
        """
        if self._locked:
            return
        for _ in range(2):
            touched = self.conn.execute(
                t_head.update().where(t_head.c.id == 1).values(seq=t_head.c.seq)
            ).rowcount
            if touched:
                self._locked = True
                return
            # The first append ever creates the head. "Do nothing" on a conflict rather
            # than catching an error: a failed statement would end a PostgreSQL
            # transaction, and a concurrent creator's row is what the update then locks.
            self.conn.execute(_insert_ignore(self.conn, t_head, id=1, seq=0, hash=GENESIS))
        raise RuntimeError("the audit chain head row could not be created")

    def append(
        self,
        actor: str,
        action: str,
        target: str,
        *,
        before: Any = None,
        after: Any = None,
        reason: str = "",
    ) -> AuditRecord:
        self.lock()
        head = self.conn.execute(sa.select(t_head.c.seq, t_head.c.hash).where(t_head.c.id == 1))
        seq, prev = head.one()
        seq += 1
        at = utcnow()
        before_s, after_s = canonical(before), canonical(after)
        digest = record_hash(seq, at, actor, action, target, before_s, after_s, reason, prev)
        self.conn.execute(
            t_log.insert().values(
                seq=seq,
                at=at,
                actor=actor,
                action=action,
                target=target,
                before=before_s,
                after=after_s,
                reason=reason,
                prev_hash=prev,
                hash=digest,
            )
        )
        self.conn.execute(t_head.update().where(t_head.c.id == 1).values(seq=seq, hash=digest))
        return AuditRecord(seq, at, actor, action, target, before, after, reason, prev, digest)


def _insert_ignore(conn: sa.Connection, table: sa.Table, **values: Any) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).values(**values).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).values(**values).on_conflict_do_nothing()


@contextlib.contextmanager
def audited(engine: sa.Engine) -> Iterator[Audit]:
    """One transaction that holds the chain lock from its first statement."""
    with engine.begin() as conn:
        audit = Audit(conn)
        audit.lock()
        yield audit


def append(engine: sa.Engine, actor: str, action: str, target: str, **fields: Any) -> AuditRecord:
    """Append one record in a transaction of its own (e.g. a refusal)."""
    with audited(engine) as audit:
        return audit.append(actor, action, target, **fields)


def read(
    engine: sa.Engine,
    *,
    target_prefix: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> list[AuditRecord]:
    query = sa.select(t_log).order_by(t_log.c.seq)
    if target_prefix is not None:
        query = query.where(
            sa.or_(t_log.c.target == target_prefix, t_log.c.target.startswith(target_prefix + ":"))
        )
    if since is not None:
        # In UTC, as the records are written: SQLite compares the stored text, which
        # carries no zone, so a bound in another zone would shift by its offset.
        query = query.where(t_log.c.at >= _aware(since))
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [_record(r) for r in rows]


def _record(r: Any) -> AuditRecord:
    return AuditRecord(
        seq=int(r.seq),
        at=_aware(r.at),
        actor=r.actor,
        action=r.action,
        target=r.target,
        before=json.loads(r.before),
        after=json.loads(r.after),
        reason=r.reason,
        prev_hash=r.prev_hash.strip(),
        hash=r.hash.strip(),
    )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    problem: str = ""
    first_bad_seq: int | None = None


def verify(engine: sa.Engine) -> VerifyResult:
    """Recompute the chain; name the first record that was changed, inserted or removed."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t_log).order_by(t_log.c.seq)).all()
        head = conn.execute(sa.select(t_head.c.seq, t_head.c.hash).where(t_head.c.id == 1)).first()
    prev_hash, expected_seq = GENESIS, 1
    for r in rows:
        seq = int(r.seq)
        stored = r.hash.strip()
        recomputed = record_hash(
            seq,
            r.at,
            r.actor,
            r.action,
            r.target,
            r.before,
            r.after,
            r.reason,
            r.prev_hash.strip(),
        )
        if seq != expected_seq:
            if seq > expected_seq:
                what = f"record {expected_seq} was removed (the chain jumps to {seq})"
                return VerifyResult(False, len(rows), what, expected_seq)
            return VerifyResult(False, len(rows), f"record {seq} is out of order", seq)
        if r.prev_hash.strip() != prev_hash:
            what = (
                f"record {seq} does not chain to record {seq - 1}: record {seq} was inserted "
                f"or record {seq - 1} was changed"
            )
            return VerifyResult(False, len(rows), what, seq)
        if recomputed != stored:
            what = f"record {seq} was changed (its hash no longer matches its contents)"
            return VerifyResult(False, len(rows), what, seq)
        prev_hash = stored
        expected_seq = seq + 1
    last_seq = expected_seq - 1
    if head is None:
        if rows:
            return VerifyResult(False, len(rows), "the chain head row is missing", None)
        return VerifyResult(True, 0)
    if int(head.seq) != last_seq or head.hash.strip() != prev_hash:
        if int(head.seq) > last_seq:
            what = f"records {last_seq + 1}..{int(head.seq)} were removed from the end"
            return VerifyResult(False, len(rows), what, last_seq + 1)
        what = f"the chain head (record {int(head.seq)}) does not match the last record {last_seq}"
        return VerifyResult(False, len(rows), what, last_seq)
    return VerifyResult(True, len(rows))
