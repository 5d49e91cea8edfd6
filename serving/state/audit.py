"""The tamper-evident audit log: an append-only MAC chain in the state database.

Every record carries the MAC of the previous record and its own MAC (HMAC-SHA256)
over a canonical encoding of all its fields, so editing, inserting or removing a row
breaks the chain at that row; the key is kept outside the database
(:mod:`serving.state.audit_key`), so a writer of the database cannot re-chain what it
changed. Records written before the MAC (up to ``audit_head.legacy_seq``) keep the
plain sha256 rule they were written with. ``audit_head`` holds the last sequence
number and MAC: every append starts by locking that row (a row lock on PostgreSQL,
the database write lock on SQLite), so concurrent CLI calls and the gateway append
one after another and never fork the chain. After the commit, the newest record is
anchored outside the database, so removing the newest records and rewinding the head
is noticed too.

Actions write their own rows and the audit record in the same transaction
(:func:`audited`), so a change is never committed without its record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from serving.state.audit_key import AnchorLine, AuditKeyError, Chain, bind, chain_of
from serving.state.db import audit_head as t_head
from serving.state.db import audit_log as t_log
from serving.state.db import utcnow

GENESIS = "0" * 64


class AuditKeyMismatch(AuditKeyError):
    """The chain was written with another key than this process holds."""


def configure(
    engine: sa.Engine,
    state_dir: Path,
    *,
    key_file: Path | None = None,
    anchor_file: Path | None = None,
    anchor_interval_s: float = 0.0,
) -> None:
    """Where ``engine``'s audit key and anchor file are (relative paths: in
    ``state_dir``); reads the key now, making the key file if there is none, so a
    missing or exposed key stops a start rather than the first audited action."""
    chain = Chain(
        state_dir,
        key_file=key_file,
        anchor_file=anchor_file,
        anchor_interval_s=anchor_interval_s,
    )
    chain.key()
    bind(engine, chain)


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


def _body(
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    before: str,
    after: str,
    reason: str,
    prev_hash: str,
) -> bytes:
    fields = [seq, _aware(at).isoformat(), actor, action, target, before, after, reason, prev_hash]
    return canonical(fields).encode("utf-8")


def record_hash(*fields: Any) -> str:
    """The plain sha256 rule of the records written before the MAC."""
    return hashlib.sha256(_body(*fields)).hexdigest()


class Audit:
    """Appends to and reads the chain through one connection's transaction."""

    def __init__(self, conn: sa.Connection, chain: Chain) -> None:
        self.conn = conn
        self.chain = chain
        self._locked = False
        # The newest record appended here: (seq, mac, legacy_seq), anchored after commit.
        self.last: tuple[int, str, int] | None = None

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
        key = self.chain.key()
        head = self.conn.execute(
            sa.select(
                t_head.c.seq,
                t_head.c.hash,
                t_head.c.legacy_seq,
                t_head.c.key_id,
                t_head.c.legacy_mac,
            ).where(t_head.c.id == 1)
        ).one()
        if head.key_id is None:
            values = {"key_id": key.key_id}
            if head.legacy_mac is None and self._may_seal(int(head.seq), int(head.legacy_seq)):
                values["legacy_mac"] = key.boundary_mac(int(head.legacy_seq))
            self.conn.execute(t_head.update().where(t_head.c.id == 1).values(**values))
        elif head.key_id != key.key_id:
            raise AuditKeyMismatch(
                f"the audit chain is written with another key than {key.source}: give every "
                "gateway and command of this database the same key (GPUGATE_AUDIT_KEY or "
                "audit.key_file)"
            )
        seq, prev = int(head.seq) + 1, head.hash.strip()
        at = utcnow()
        before_s, after_s = canonical(before), canonical(after)
        digest = key.mac(_body(seq, at, actor, action, target, before_s, after_s, reason, prev))
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
        self.last = (seq, digest, int(head.legacy_seq))
        return AuditRecord(seq, at, actor, action, target, before, after, reason, prev, digest)

    def _may_seal(self, seq: int, legacy_seq: int) -> bool:
        """Whether the old-rule boundary may be sealed now, at the first keyed append.

        Trust on first use, as the migration that set it: the boundary is taken as it
        stands when nothing after it was MACed yet. A head that lost its key id while
        it holds a seal or MAC records exist (in the log, or in this host's anchors)
        was tampered with: it is not sealed anew, so that ``verify`` keeps reporting it.
        """
        if seq != legacy_seq:
            return False
        return all(a.seq <= a.legacy_seq for a in self.chain.anchors.read())


def _insert_ignore(conn: sa.Connection, table: sa.Table, **values: Any) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).values(**values).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).values(**values).on_conflict_do_nothing()


@contextlib.contextmanager
def audited(engine: sa.Engine) -> Iterator[Audit]:
    """One transaction that holds the chain lock from its first statement; the newest
    record it appended is anchored once it is committed."""
    chain = chain_of(engine)
    with engine.begin() as conn:
        audit = Audit(conn, chain)
        audit.lock()
        yield audit
    if audit.last is not None:
        chain.anchors.record(*audit.last)


def append(engine: sa.Engine, actor: str, action: str, target: str, **fields: Any) -> AuditRecord:
    """Append one record in a transaction of its own (e.g. a refusal)."""
    with audited(engine) as audit:
        return audit.append(actor, action, target, **fields)


def model_targets(model: str) -> tuple[str, ...]:
    """The target prefixes of everything about ``model``: its versions and its rollouts."""
    return (f"model:{model}", f"rollout:{model}")


def read(
    engine: sa.Engine,
    *,
    target_prefix: str | Sequence[str] | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    actors: Sequence[str] = (),
    actions: Sequence[str] = (),
    targets: Sequence[str] = (),
    until: datetime | None = None,
    after_seq: int | None = None,
    before_seq: int | None = None,
    newest_first: bool = False,
) -> list[AuditRecord]:
    """Records oldest first (``newest_first``: newest first); ``target_prefix``: only
    those whose target is one of the prefixes or starts with it and ``:`` (taken
    literally: ``_`` and ``%`` too). ``actors``, ``actions``, ``targets``: only records
    matching one of the patterns given for each, a pattern being an exact value or, ending
    in ``*``, a prefix (literal and case-sensitive). ``since`` includes its instant,
    ``until`` excludes it; ``after_seq`` and ``before_seq`` are exclusive bounds on the
    sequence number, for paging."""
    order = t_log.c.seq.desc() if newest_first else t_log.c.seq
    query = sa.select(t_log).order_by(order)
    if target_prefix is not None:
        prefixes = [target_prefix] if isinstance(target_prefix, str) else list(target_prefix)
        query = query.where(
            sa.or_(
                *(
                    sa.or_(t_log.c.target == p, t_log.c.target.startswith(p + ":", autoescape=True))
                    for p in prefixes
                )
            )
        )
    c = t_log.c
    for column, patterns in ((c.actor, actors), (c.action, actions), (c.target, targets)):
        if patterns:
            query = query.where(sa.or_(*(_matches(column, p) for p in patterns)))
    if since is not None:
        # In UTC, as the records are written: SQLite compares the stored text, which
        # carries no zone, so a bound in another zone would shift by its offset.
        query = query.where(t_log.c.at >= _aware(since))
    if until is not None:
        query = query.where(t_log.c.at < _aware(until))
    if after_seq is not None:
        query = query.where(t_log.c.seq > after_seq)
    if before_seq is not None:
        query = query.where(t_log.c.seq < before_seq)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [_record(r) for r in rows]


def _matches(column: sa.Column[str], pattern: str) -> sa.ColumnElement[bool]:
    """``pattern`` exactly, or as a prefix when it ends in ``*``. SQLite's LIKE ignores
    the case of ASCII letters: the comparison of the leading characters keeps it exact."""
    if not pattern.endswith("*"):
        return column == pattern
    prefix = pattern[:-1]
    return sa.and_(
        column.startswith(prefix, autoescape=True),
        sa.func.substr(column, 1, len(prefix)) == prefix,
    )


def last_anchor(engine: sa.Engine) -> AnchorLine | None:
    """The newest record this host anchored for ``engine``'s chain (None: none)."""
    anchors = chain_of(engine).anchors.read()
    return max(anchors, key=lambda a: a.seq) if anchors else None


def head_of(engine: sa.Engine) -> tuple[int, str] | None:
    """The chain head's sequence number and MAC, one cheap read (None: no record yet)."""
    with engine.connect() as conn:
        head = conn.execute(sa.select(t_head.c.seq, t_head.c.hash).where(t_head.c.id == 1)).first()
    return (int(head.seq), head.hash.strip()) if head is not None else None


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
    # The newest record this host anchored and found intact (None: none anchored here).
    anchored_seq: int | None = None
    # What this check could not establish (e.g. no anchor here to check the end against).
    warnings: tuple[str, ...] = ()


UNANCHORED = "unanchored on this host: a deleted tail cannot be detected here"


def _snapshot(engine: sa.Engine) -> tuple[Sequence[Any], Any]:
    """The log and its head as of one instant, whatever is appended meanwhile."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        elif conn.dialect.name == "sqlite":
            # pysqlite opens no transaction for reads: without BEGIN each SELECT would
            # see the database as of its own start.
            conn.exec_driver_sql("BEGIN")
        try:
            rows = conn.execute(sa.select(t_log).order_by(t_log.c.seq)).all()
            head = conn.execute(sa.select(t_head).where(t_head.c.id == 1)).first()
        finally:
            conn.rollback()
    return rows, head


def verify(engine: sa.Engine) -> VerifyResult:
    """Recompute the chain and check it against this host's anchors; name the first
    record that was changed, inserted or removed."""
    chain = chain_of(engine)
    # The anchors first: every record they name was committed before the snapshot.
    anchors = chain.anchors.read()
    rows, head = _snapshot(engine)
    legacy_seq = int(head.legacy_seq) if head is not None else 0
    try:
        key = chain.key(create=False)
    except AuditKeyError as exc:
        key, key_problem = None, str(exc)
    bad = _check_chain(rows, legacy_seq, key)
    if bad is not None:
        return VerifyResult(False, len(rows), *bad)
    if rows and int(rows[-1].seq) > legacy_seq:
        if key is None:
            what = f"records {legacy_seq + 1}.. are MACed and no audit key is here: {key_problem}"
            return VerifyResult(False, len(rows), what, legacy_seq + 1)
        if head is not None and head.key_id is not None and head.key_id != key.key_id:
            what = f"the chain was written with another key than {key.source}"
            return VerifyResult(False, len(rows), what, legacy_seq + 1)
    last_seq = int(rows[-1].seq) if rows else 0
    prev_hash = rows[-1].hash.strip() if rows else GENESIS
    if head is None:
        if rows:
            return VerifyResult(False, len(rows), "the chain head row is missing", None)
    elif int(head.seq) != last_seq or head.hash.strip() != prev_hash:
        if int(head.seq) > last_seq:
            what = f"records {last_seq + 1}..{int(head.seq)} were removed from the end"
            return VerifyResult(False, len(rows), what, last_seq + 1)
        what = f"the chain head (record {int(head.seq)}) does not match the last record {last_seq}"
        return VerifyResult(False, len(rows), what, last_seq)
    warnings = []
    if head is not None:
        boundary = _check_boundary(head, last_seq, legacy_seq, key)
        if isinstance(boundary, tuple):
            return VerifyResult(False, len(rows), *boundary)
        if boundary:
            warnings.append(boundary)
    macs = {int(r.seq): r.hash.strip() for r in rows}
    found = _check_anchors(anchors, macs, last_seq, legacy_seq)
    if isinstance(found, tuple):
        return VerifyResult(False, len(rows), *found)
    if found is None:
        warnings.append(UNANCHORED)
    return VerifyResult(True, len(rows), anchored_seq=found, warnings=tuple(warnings))


def _check_boundary(
    head: Any, last_seq: int, legacy_seq: int, key: Any
) -> tuple[str, int] | str | None:
    """The old-rule boundary against its seal: a problem, a warning, or None.

    ``key_id`` and ``legacy_mac`` are set by the first keyed append, in the transaction
    that writes the first MAC record; so either both are missing and nothing follows
    the boundary, or both are there and MAC records follow it. A writer without the
    key can move ``legacy_seq`` (to re-chain records by the plain rule) only by
    clearing both and claiming every record for the old rule: that state is the one
    an upgrade leaves before its first append, and is reported as a warning.
    """
    keyed = last_seq > legacy_seq
    seal = head.legacy_mac.strip() if head.legacy_mac is not None else None
    if seal is None and head.key_id is None and not keyed:
        if legacy_seq == 0:
            return None  # nothing was ever written by either rule
        return (
            f"the old-rule boundary (record {legacy_seq}) is not sealed with the audit key "
            "yet (the next audited action seals it): until then it is taken on trust"
        )
    if seal is None:
        return (
            f"the seal of the old-rule boundary (record {legacy_seq}) was removed from the "
            "audit head: records may have been re-chained by the plain rule",
            1,
        )
    if not keyed or head.key_id is None:
        return (
            f"the old-rule boundary was moved: the audit head claims records 1..{legacy_seq} "
            "for the old rule but was keyed after them: records were re-chained by the plain "
            "rule",
            1,
        )
    if key is not None and key.boundary_mac(legacy_seq) != seal:
        return (
            f"the old-rule boundary (record {legacy_seq}) is not the one sealed with the "
            "audit key: it was moved, and records re-chained by the plain rule",
            1,
        )
    return None


def _check_chain(rows: Sequence[Any], legacy_seq: int, key: Any) -> tuple[str, int | None] | None:
    prev_hash, expected_seq = GENESIS, 1
    for r in rows:
        seq = int(r.seq)
        stored = r.hash.strip()
        if seq != expected_seq:
            if seq > expected_seq:
                return f"record {expected_seq} was removed (the chain jumps to {seq})", expected_seq
            return f"record {seq} is out of order", seq
        if r.prev_hash.strip() != prev_hash:
            what = (
                f"record {seq} does not chain to record {seq - 1}: record {seq} was inserted "
                f"or record {seq - 1} was changed"
            )
            return what, seq
        body = _body(seq, r.at, r.actor, r.action, r.target, r.before, r.after, r.reason, prev_hash)
        if seq <= legacy_seq:
            recomputed = hashlib.sha256(body).hexdigest()
        elif key is None:
            return None  # the caller reports the missing key
        else:
            recomputed = key.mac(body)
        if recomputed != stored:
            return f"record {seq} was changed (its MAC no longer matches its contents)", seq
        prev_hash = stored
        expected_seq = seq + 1
    return None


def _check_anchors(
    anchors: Sequence[AnchorLine], macs: dict[int, str], last_seq: int, legacy_seq: int
) -> tuple[str, int] | int | None:
    """The newest intact anchored seq (None: no anchors), or the problem found."""
    if not anchors:
        return None
    latest = max(anchors, key=lambda a: a.seq)
    if latest.seq > last_seq:
        what = (
            f"record {latest.seq} was anchored at {latest.at} but the log ends at record "
            f"{last_seq}: records were removed from the end and the head rewound"
        )
        return what, last_seq + 1
    for a in anchors:
        if macs.get(a.seq) != a.mac:
            what = (
                f"record {a.seq} differs from the one anchored at {a.at}: the chain was "
                f"rewritten at or before record {a.seq}"
            )
            return what, a.seq
        if a.legacy_seq != legacy_seq:
            what = (
                f"the chain's old-rule boundary moved from record {a.legacy_seq} (anchored at "
                f"{a.at}) to {legacy_seq}: records were re-chained by the plain rule"
            )
            return what, min(a.legacy_seq, legacy_seq) + 1
    return latest.seq
