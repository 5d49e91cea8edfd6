"""The audit chain against a database writer, on a SQLite file and PostgreSQL: records
MACed with a key outside the database, the head anchored outside it, verify reading one
snapshot. Each attack is one a writer of the database can do without the key."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.insights.risk import ChainCheck
from serving.state import AuditKeyError, audit, audit_head, audit_key, audit_log, open_engine
from serving.state.audit_key import ANCHOR_FILE, KEY_ENV, KEY_FILE
from tests.integration.conftest import OpenEngine

FIXTURE = Path(__file__).resolve().parents[3] / "fixtures" / "state_045d7eb.db"


@pytest.fixture
def engine(open_db: OpenEngine, monkeypatch: pytest.MonkeyPatch) -> sa.Engine:
    monkeypatch.delenv(KEY_ENV, raising=False)
    return open_db()


def state_dir_of(engine: sa.Engine) -> Path:
    return audit.chain_of(engine).state_dir


def fill(engine: sa.Engine, n: int = 5) -> list[audit.AuditRecord]:
    for i in range(n):
        audit.append(engine, "alice", "test.act", f"t:{i}", after={"i": i})
    return audit.read(engine)


def plain_rechain(engine: sa.Engine, *, from_seq: int, actor: str) -> None:
    """What a writer without the key can do: rewrite ``from_seq`` and recompute every
    hash after it, and the head, by the plain sha256 rule."""
    with engine.begin() as conn:
        rows = conn.execute(sa.select(audit_log).order_by(audit_log.c.seq)).all()
        prev = audit.GENESIS
        for r in rows:
            actor_now = actor if int(r.seq) == from_seq else r.actor
            digest = audit.record_hash(
                int(r.seq), r.at, actor_now, r.action, r.target, r.before, r.after, r.reason, prev
            )
            conn.execute(
                audit_log.update()
                .where(audit_log.c.seq == r.seq)
                .values(actor=actor_now, prev_hash=prev, hash=digest)
            )
            prev = digest
        # ... and claims every record was written by the old, unkeyed rule.
        conn.execute(audit_head.update().values(hash=prev, legacy_seq=len(rows)))


def test_records_are_maced_with_a_key_kept_outside_the_database(engine: sa.Engine) -> None:
    records = fill(engine)
    key_file = state_dir_of(engine) / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    with engine.connect() as conn:
        dumped = json.dumps([list(map(str, r)) for r in conn.execute(sa.select(audit_log))])
        head = conn.execute(sa.select(audit_head)).one()
    assert key not in dumped and key not in str(head)
    assert head.legacy_seq == 0 and head.key_id == audit.chain_of(engine).key().key_id
    # Not the plain rule: a record's hash is not the sha256 of its fields.
    r = records[0]
    plain = audit.record_hash(
        1,
        r.at,
        r.actor,
        r.action,
        r.target,
        audit.canonical(r.before),
        audit.canonical(r.after),
        r.reason,
        r.prev_hash,
    )
    assert r.hash != plain
    checked = audit.verify(engine)
    assert checked.ok and checked.records == 5 and checked.anchored_seq == 5


def test_a_rewritten_record_is_detected(engine: sa.Engine) -> None:
    fill(engine)
    with engine.begin() as conn:
        conn.execute(audit_log.update().where(audit_log.c.seq == 2).values(reason="edited"))
    checked = audit.verify(engine)
    assert not checked.ok and checked.first_bad_seq == 2
    assert "record 2 was changed" in checked.problem


def test_a_rechained_log_is_detected_even_when_it_claims_the_old_rule(
    engine: sa.Engine,
) -> None:
    fill(engine)
    plain_rechain(engine, from_seq=2, actor="mallory")
    checked = audit.verify(engine)
    assert not checked.ok
    assert "anchored" in checked.problem or "boundary" in checked.problem, checked.problem
    # Without the trick on the boundary the MAC alone catches it.
    with engine.begin() as conn:
        conn.execute(audit_head.update().values(legacy_seq=0))
    checked = audit.verify(engine)
    assert not checked.ok and checked.first_bad_seq == 1


def test_deleting_the_tail_and_rewinding_the_head_is_detected(engine: sa.Engine) -> None:
    records = fill(engine)
    with engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq > 3))
        conn.execute(audit_head.update().values(seq=3, hash=records[2].hash))
    checked = audit.verify(engine)
    assert not checked.ok and checked.first_bad_seq == 4
    assert "record 5 was anchored" in checked.problem
    assert "removed from the end and the head rewound" in checked.problem


def test_anchor_lines_hold_seq_and_mac_and_survive_a_torn_line(engine: sa.Engine) -> None:
    records = fill(engine, 3)
    anchor = state_dir_of(engine) / ANCHOR_FILE
    assert stat.S_IMODE(anchor.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in anchor.read_text().splitlines()]
    assert [(a["seq"], a["mac"]) for a in lines] == [(r.seq, r.hash) for r in records]
    with anchor.open("a") as f:
        f.write('{"seq": 9, "mac": "')  # a crash mid-line
    assert audit.verify(engine).ok


def test_an_interval_anchors_at_most_once_per_interval(
    open_db: OpenEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    engine = open_db()
    audit.configure(engine, state_dir_of(engine), anchor_file=Path("a2"), anchor_interval_s=3600)
    fill(engine, 4)
    lines = (state_dir_of(engine) / "a2").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1]
    assert audit.verify(engine).anchored_seq == 1


def test_a_key_file_others_may_read_is_refused(engine: sa.Engine) -> None:
    fill(engine, 1)
    key_file = state_dir_of(engine) / KEY_FILE
    key_file.chmod(0o644)
    with pytest.raises(AuditKeyError, match=r"mode 0644: others may read it; run `chmod 600"):
        audit.configure(engine, state_dir_of(engine))
    fresh = open_engine(None, state_dir_of(engine) / "other")
    try:
        (state_dir_of(engine) / "other" / KEY_FILE).write_text("x" * 64)
        (state_dir_of(engine) / "other" / KEY_FILE).chmod(0o640)
        with pytest.raises(AuditKeyError, match="mode 0640"):
            audit.append(fresh, "alice", "test.act", "t:x")
    finally:
        fresh.dispose()


def test_the_env_key_wins_and_another_key_cannot_append_or_verify(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, open_db: OpenEngine
) -> None:
    monkeypatch.setenv(KEY_ENV, "k" * 40)
    audit.configure(engine, state_dir_of(engine))
    fill(engine, 2)
    assert not (state_dir_of(engine) / KEY_FILE).exists()
    assert audit.verify(engine).ok
    monkeypatch.setenv(KEY_ENV, "z" * 40)
    other = open_db()  # another gateway, holding another key
    with pytest.raises(audit.AuditKeyMismatch, match="another key"):
        audit.append(other, "bob", "test.act", "t:y")
    checked = audit.verify(other)
    assert not checked.ok and checked.first_bad_seq == 1
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(AuditKeyError, match="under 32 characters"):
        audit.append(open_db(), "bob", "test.act", "t:y")


def test_verify_reads_one_snapshot_while_others_append(open_db: OpenEngine) -> None:
    """Appends from another engine (as another process would) while verify runs again
    and again: every verdict is intact."""
    writer_engine, reader = open_db(), open_db()
    fill(writer_engine, 3)
    stop = threading.Event()
    appended = 0
    errors: list[BaseException] = []

    def writer() -> None:
        nonlocal appended
        try:
            while not stop.is_set():
                audit.append(writer_engine, "w", "test.act", f"t:{appended}")
                appended += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    verdicts = []
    try:
        for _ in range(150):
            verdicts.append(audit.verify(reader))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert appended > 20  # the appends really overlapped the verifies
    assert [v.problem for v in verdicts if not v.ok] == []
    assert audit.verify(reader).records == 3 + appended


def test_model_filter_is_literal_and_includes_rollouts(engine: sa.Engine) -> None:
    for target in ("model:a_b:1", "model:axb:1", "model:a_b", "rollout:a_b", "rollout:axb"):
        audit.append(engine, "alice", "test.act", target)
    found = [r.target for r in audit.read(engine, target_prefix=audit.model_targets("a_b"))]
    assert found == ["model:a_b:1", "model:a_b", "rollout:a_b"]
    assert [r.target for r in audit.read(engine, target_prefix="model:a%")] == []


def test_old_records_keep_the_old_rule_and_new_ones_get_the_mac(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    shutil.copyfile(FIXTURE, state_dir / "gpugate.db")
    engine = open_engine(None, state_dir)
    try:
        old = audit.read(engine)
        assert audit.verify(engine).ok
        audit.append(engine, "alice", "test.act", "t:new")
        checked = audit.verify(engine)
        assert checked.ok and checked.records == len(old) + 1
        assert checked.anchored_seq == len(old) + 1
        with engine.connect() as conn:
            head = conn.execute(sa.select(audit_head)).one()
        assert head.legacy_seq == len(old)
        # An old record rewritten by the plain rule breaks the first MACed record's link.
        plain_rechain(engine, from_seq=1, actor="mallory")
        with engine.begin() as conn:
            conn.execute(audit_head.update().values(legacy_seq=len(old)))
        checked = audit.verify(engine)
        assert not checked.ok and checked.first_bad_seq == len(old) + 1
    finally:
        engine.dispose()


def test_the_sqlite_file_and_its_folder_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        state_dir = tmp_path / "fresh"
        engine = open_engine(None, state_dir)
        try:
            audit.append(engine, "alice", "test.act", "t:1")
            with engine.connect() as conn:  # keeps the -wal and -shm files open
                conn.execute(sa.select(audit_log)).all()
                modes = {
                    p.name: stat.S_IMODE(p.stat().st_mode)
                    for p in state_dir.iterdir()
                    if p.name.startswith("gpugate.db")
                }
            assert modes == {"gpugate.db": 0o600, "gpugate.db-wal": 0o600, "gpugate.db-shm": 0o600}
            assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        finally:
            engine.dispose()
        # A file an older gpugate left 0644 is made private at the next start.
        (state_dir / "gpugate.db").chmod(0o644)
        open_engine(None, state_dir).dispose()
        assert stat.S_IMODE((state_dir / "gpugate.db").stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_an_existing_state_folder_open_to_others_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "old"
    state_dir.mkdir()
    state_dir.chmod(0o755)  # as an older gpugate, or a plain mkdir, left it
    with caplog.at_level(logging.WARNING, logger="serving.state.audit_key"):
        open_engine(None, state_dir).dispose()
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        open_engine(None, state_dir).dispose()
    made_private = [r for r in caplog.records if "made it 0700" in r.getMessage()]
    assert len(made_private) == 1 and "mode 0755" in made_private[0].getMessage()


def test_concurrent_starters_never_read_a_half_made_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A starter that finds the key file while another is still writing it must read
    the whole key, not an empty file."""
    path = tmp_path / "k" / KEY_FILE
    writing = threading.Event()
    real_token_hex = secrets.token_hex

    def slow_token_hex(n: int) -> str:
        if n == 32:  # the key itself: make the other starter arrive meanwhile
            writing.set()
            time.sleep(0.5)
        return real_token_hex(n)

    monkeypatch.setattr(audit_key.secrets, "token_hex", slow_token_hex)
    keys: dict[str, object] = {}

    def start(name: str) -> None:
        try:
            keys[name] = audit_key.create_key_file(path)
        except BaseException as exc:
            keys[name] = exc

    first = threading.Thread(target=start, args=("first",))
    first.start()
    assert writing.wait(5)
    start("second")
    first.join()
    assert isinstance(keys["first"], audit_key.AuditKey), keys["first"]
    assert isinstance(keys["second"], audit_key.AuditKey), keys["second"]
    assert keys["first"].secret == keys["second"].secret  # type: ignore[union-attr]
    assert path.read_text().strip().encode() == keys["first"].secret  # type: ignore[union-attr]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temporary left


def unanchored_plain_rechain(engine: sa.Engine, **head: object) -> None:
    """The review's attack, where no anchor can help: this host's anchor file is gone
    (or verify runs on another host), record 2 is rewritten, every record re-chained by
    the plain rule and claimed for it, and the head cleared of its key."""
    (state_dir_of(engine) / ANCHOR_FILE).unlink()
    plain_rechain(engine, from_seq=2, actor="mallory")
    with engine.begin() as conn:
        conn.execute(audit_head.update().values(key_id=None, **head))


def test_the_old_rule_boundary_is_sealed_with_the_key(engine: sa.Engine) -> None:
    fill(engine, 3)
    key = audit.chain_of(engine).key()
    with engine.connect() as conn:
        head = conn.execute(sa.select(audit_head)).one()
    assert head.legacy_seq == 0 and head.legacy_mac == key.boundary_mac(0)
    assert key.boundary_mac(0) != key.boundary_mac(3)
    assert audit.verify(engine).warnings == ()
    unanchored_plain_rechain(engine)
    checked = audit.verify(engine)
    assert not checked.ok and checked.first_bad_seq == 1
    assert "claims records 1..3 for the old rule" in checked.problem


def test_a_moved_boundary_with_a_forged_seal_is_detected(engine: sa.Engine) -> None:
    fill(engine, 3)
    unanchored_plain_rechain(engine, legacy_mac="0" * 64)
    checked = audit.verify(engine)
    assert not checked.ok and "claims records 1..3" in checked.problem
    # Keeping the key id and a record past the boundary does not help either.
    audit.append(engine, "alice", "test.act", "t:4")
    with engine.begin() as conn:
        conn.execute(audit_head.update().values(key_id=audit.chain_of(engine).key().key_id))
    checked = audit.verify(engine)
    assert not checked.ok and "not the one sealed with the audit key" in checked.problem


def test_a_removed_seal_is_detected_and_not_renewed_where_anchors_saw_mac_records(
    engine: sa.Engine,
) -> None:
    fill(engine, 3)
    with engine.begin() as conn:
        conn.execute(audit_head.update().values(legacy_mac=None))
    checked = audit.verify(engine)
    assert not checked.ok and "seal of the old-rule boundary" in checked.problem
    # Cleared whole, with the anchors of this host still in place: the next append
    # does not seal the forged boundary, and verify keeps saying so.
    plain_rechain(engine, from_seq=2, actor="mallory")
    with engine.begin() as conn:
        conn.execute(audit_head.update().values(key_id=None, legacy_mac=None))
    assert not audit.verify(engine).ok
    audit.append(engine, "alice", "test.act", "t:4")
    with engine.connect() as conn:
        assert conn.execute(sa.select(audit_head.c.legacy_mac)).scalar_one() is None
    checked = audit.verify(engine)
    assert not checked.ok and "seal of the old-rule boundary" in checked.problem


def test_an_unsealed_boundary_and_a_missing_anchor_are_warnings(engine: sa.Engine) -> None:
    fill(engine, 3)
    # Cleared whole, and no anchor here: the state an upgrade leaves before its first
    # append. It is taken on trust, and said to be.
    unanchored_plain_rechain(engine, legacy_mac=None)
    checked = audit.verify(engine)
    assert checked.ok and checked.anchored_seq is None
    assert checked.warnings == (
        "the old-rule boundary (record 3) is not sealed with the audit key yet (the next "
        "audited action seals it): until then it is taken on trust",
        audit.UNANCHORED,
    )


def test_a_skipped_anchor_is_written_when_the_interval_is_over(
    open_db: OpenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No later append is needed: records appended inside the interval are anchored by
    its end, so none waits unanchored longer than the interval."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    engine = open_db()
    audit.configure(engine, state_dir_of(engine), anchor_file=Path("a3"), anchor_interval_s=0.5)
    fill(engine, 4)
    anchor = state_dir_of(engine) / "a3"
    started = time.monotonic()

    def anchored() -> list[int]:
        return [json.loads(line)["seq"] for line in anchor.read_text().splitlines()]

    while anchored()[-1] != 4 and time.monotonic() - started < 5:
        time.sleep(0.05)
    assert anchored() == [1, 4]
    checked = audit.verify(engine)
    assert checked.ok and checked.anchored_seq == 4


def test_the_overviews_check_runs_again_when_the_head_moves_or_goes_stale(
    engine: sa.Engine,
) -> None:
    """The overview's chain check (serving.insights.risk.ChainCheck) verifies the whole log
    once, answers from that while the head stays, and verifies again after an append or
    once its result is ``every_s`` old: a rewrite that leaves the head alone is found
    then."""
    fill(engine, 3)
    check = ChainCheck(engine, every_s=0.5)
    first = check()
    assert first["ok"] and first["records"] == 3 and check.runs == 1
    assert check() is first and check.runs == 1  # the head has not moved
    audit.append(engine, "bob", "test.act", "t:3")
    moved = check()
    assert moved["ok"] and moved["records"] == 4 and check.runs == 2
    with engine.begin() as conn:  # a writer without the key; the head stays as it was
        conn.execute(audit_log.update().where(audit_log.c.seq == 2).values(actor="mallory"))
    assert check()["ok"] and check.runs == 2  # not yet: within every_s of the last run
    time.sleep(0.6)
    stale = check()
    assert not stale["ok"] and stale["first_bad_seq"] == 2 and check.runs == 3
