"""What keeps the audit chain honest outside the database: its MAC key and its anchors.

A writer of the database can change any row, so the chain's records are MACed
(HMAC-SHA256) with a key the database never holds: ``$GPUGATE_AUDIT_KEY``, else a
key file (``audit.key`` in the state folder, made with mode 0600 at the first
start). A key file that its group or others may read is refused.

The MAC stops forged and re-chained records, but not a writer who deletes the newest
records and rewinds ``audit_head``: that is what the anchor is for. After every
append (or at most every ``anchor_interval_s``), the newest record's sequence number
and MAC go to an append-only file (``audit.anchor``, one JSON line each, fsynced),
to the log (logger ``gpugate.audit.anchor``) and to an OpenTelemetry span. The file
is per host: each gateway anchors what it appended itself.

:func:`bind` remembers, per engine, where these live; :func:`chain_of` finds them.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from opentelemetry import trace

log = logging.getLogger(__name__)
anchor_log = logging.getLogger("gpugate.audit.anchor")
_tracer = trace.get_tracer("gpugate.audit")

KEY_ENV = "GPUGATE_AUDIT_KEY"
KEY_FILE = "audit.key"
ANCHOR_FILE = "audit.anchor"
MIN_KEY_BYTES = 32
_KEY_ID_LABEL = b"gpugate audit key id"
_BOUNDARY_LABEL = b"gpugate audit legacy_seq\0"


class AuditKeyError(RuntimeError):
    """No usable audit key: missing, too short, readable by others, or not the chain's."""


@dataclass(frozen=True)
class AuditKey:
    secret: bytes = field(repr=False)
    source: str  # where it came from, for messages (never the key)

    @property
    def key_id(self) -> str:
        """Names the key without revealing it (stored in ``audit_head.key_id``)."""
        return hmac.new(self.secret, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:32]

    def mac(self, body: bytes) -> str:
        return hmac.new(self.secret, body, hashlib.sha256).hexdigest()

    def boundary_mac(self, legacy_seq: int) -> str:
        """Seals ``audit_head.legacy_seq`` (stored in ``audit_head.legacy_mac``)."""
        return self.mac(_BOUNDARY_LABEL + str(legacy_seq).encode())


def _from_text(text: str, source: str) -> AuditKey:
    text = text.strip()
    if len(text) < MIN_KEY_BYTES:
        raise AuditKeyError(f"the audit key in {source} is under {MIN_KEY_BYTES} characters")
    return AuditKey(text.encode("utf-8"), source)


def read_key_file(path: Path) -> AuditKey:
    """The key in ``path``; refused when its group or others may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise AuditKeyError(f"no audit key file {path}") from None
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit key file {path}: {exc}") from None
    with os.fdopen(fd) as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise AuditKeyError(
                f"the audit key file {path} has mode {mode:04o}: others may read it; "
                f"run `chmod 600 {path}`"
            )
        return _from_text(f.read(), str(path))


def create_key_file(path: Path) -> AuditKey:
    """A new random key in ``path`` (mode 0600), unless another process made it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return read_key_file(path)
    # Written whole under a temporary name, then linked into place: a process starting
    # at the same moment finds either no key file or the complete one, never an empty
    # one; the loser of the link reads the winner's key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_key_file(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("created the audit key %s; keep a copy: the audit log verifies only with it", path)
    return read_key_file(path)


def private_dir(path: Path) -> None:
    """Make ``path`` (mode 0700), or take group and other access off an existing one
    that this user owns: ``mkdir(mode=...)`` leaves an existing folder as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        path.chmod(0o700)
        log.warning(
            "the state folder %s had mode %04o; made it 0700 (it holds the database "
            "and the audit key)",
            path,
            stat.S_IMODE(st.st_mode),
        )


@dataclass(frozen=True)
class AnchorLine:
    seq: int
    mac: str
    at: str
    legacy_seq: int


class Anchors:
    """The append-only anchor file of one chain on this host.

    With ``interval_s`` > 0, an append inside the interval is not anchored at once: a
    timer anchors the newest such record when the interval is over (and a clean exit
    does, at the latest), so no committed record waits more than ``interval_s`` while
    the process runs.
    """

    def __init__(self, path: Path, interval_s: float) -> None:
        self.path = path
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last_at = -float("inf")
        self._pending: tuple[int, str, int] | None = None
        self._timer: threading.Timer | None = None
        self._at_exit = False

    def record(self, seq: int, mac: str, legacy_seq: int, *, force: bool = False) -> bool:
        """Anchor record ``seq`` (committed) when due; True when it was written."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_at < self.interval_s:
                if self._pending is None or seq > self._pending[0]:
                    self._pending = (seq, mac, legacy_seq)
                if self._timer is None:
                    self._timer = threading.Timer(self._last_at + self.interval_s - now, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                    if not self._at_exit:
                        atexit.register(self.flush)
                        self._at_exit = True
                return False
            self._write(seq, mac, legacy_seq, now)
        return True

    def flush(self) -> None:
        """Anchor the newest record an append left unanchored, if any."""
        with self._lock:
            pending, self._pending = self._pending, None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if pending is not None:
                try:
                    self._write(*pending, time.monotonic())
                except OSError as exc:  # e.g. at exit, the folder gone: say so, go on
                    log.warning("could not anchor audit record %d: %s", pending[0], exc)

    def _write(self, seq: int, mac: str, legacy_seq: int, now: float) -> None:
        """One anchor line, fsynced; the caller holds the lock."""
        if self._pending is not None and self._pending[0] <= seq:
            self._pending = None  # this line covers it
        if self._timer is not None:
            self._timer.cancel()  # the next skip arms one for the next interval
            self._timer = None
        at = datetime.now(UTC).isoformat()
        line = {"seq": seq, "mac": mac, "at": at, "legacy_seq": legacy_seq}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)  # one write: lines of concurrent writers never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last_at = now
        anchor_log.info("audit anchor seq=%d mac=%s legacy_seq=%d", seq, mac, legacy_seq)
        with _tracer.start_as_current_span("gpugate.audit.anchor") as span:
            span.set_attributes({"gpugate.audit.seq": seq, "gpugate.audit.mac": mac})

    def read(self) -> list[AnchorLine]:
        """Every complete line (a line torn by a crash mid-write is skipped)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        lines = []
        for raw in text.splitlines():
            try:
                d = json.loads(raw)
                lines.append(
                    AnchorLine(int(d["seq"]), str(d["mac"]), str(d["at"]), int(d["legacy_seq"]))
                )
            except (ValueError, KeyError, TypeError):
                continue
        return lines


class Chain:
    """Where one engine's audit key and anchors live; the key is read at first use."""

    def __init__(
        self,
        state_dir: Path,
        *,
        key_file: Path | None = None,
        anchor_file: Path | None = None,
        anchor_interval_s: float = 0.0,
    ) -> None:
        self.state_dir = state_dir
        self.key_file = state_dir / (key_file or KEY_FILE)
        self.anchors = Anchors(state_dir / (anchor_file or ANCHOR_FILE), anchor_interval_s)
        self._key: AuditKey | None = None
        self._lock = threading.Lock()

    def key(self, *, create: bool = True) -> AuditKey:
        """The MAC key: ``$GPUGATE_AUDIT_KEY``, else the key file (made if ``create``)."""
        with self._lock:
            if self._key is None:
                env = os.environ.get(KEY_ENV)
                if env:
                    self._key = _from_text(env, f"${KEY_ENV}")
                elif create:
                    self._key = create_key_file(self.key_file)
                else:
                    self._key = read_key_file(self.key_file)
            return self._key


_CHAINS: weakref.WeakKeyDictionary[sa.Engine, Chain] = weakref.WeakKeyDictionary()


def bind(engine: sa.Engine, chain: Chain) -> None:
    _CHAINS[engine] = chain


def chain_of(engine: sa.Engine) -> Chain:
    chain = _CHAINS.get(engine)
    if chain is None:
        raise AuditKeyError(
            "this engine has no audit key settings: open it with serving.state.make_engine"
        )
    return chain
