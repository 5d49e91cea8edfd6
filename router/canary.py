"""Canary traffic inside the router: the weighted split, shadow comparison, and the
per-version windows that a rollout's analysis reads.

Nothing here touches the database: ``serving.rollout`` decides the weights and
hands them over as :class:`Split` values; the router applies them per request.

Routing is deterministic, never a random draw:

* **sticky** (``tenant`` or ``header:NAME``): the key is hashed with the rollout's
  salt to a point in [0, 1); it goes to the candidate while that point is below the
  candidate's weight. The same key reaches the same version for as long as the
  weight stays, and as the weight grows keys only ever move to the candidate, never
  back (a request without the header falls back to its tenant);
* **not sticky**: requests are spread by error diffusion, so after n requests the
  candidate has served ``round(n * weight)`` of them, give or take one.

Shadow requests are picked the same way among the requests that production serves.
"""

from __future__ import annotations

import hashlib
import random
import struct
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

# The cost owner (and fair-queue tenant) of mirrored requests: nobody is billed.
SHADOW_TENANT = "shadow"
# Lower numbers go first; shadow work waits behind every client's request.
SHADOW_PRIORITY = 2**31 - 1

Header = Callable[[str], "str | None"]


def bucket(salt: str, key: str) -> float:
    """A stable point in [0, 1) for ``key`` (sha256, so uniform and salt-dependent)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    high: int = struct.unpack(">Q", digest[:8])[0]
    return high / 2.0**64


@dataclass(frozen=True)
class Split:
    """How one model's default traffic is shared while a rollout runs."""

    candidate: str  # the candidate version; production is whatever the table serves
    weight: float  # share of default traffic for the candidate, 0..1
    sticky: str | None = None  # None, "tenant" or "header:<name>"
    mirror: float = 0.0  # share of production-served requests also sent to the candidate
    salt: str = ""

    def __post_init__(self) -> None:
        for name, value in (("weight", self.weight), ("mirror", self.mirror)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.sticky not in (None, "tenant") and not (
            self.sticky.startswith("header:") and len(self.sticky) > len("header:")
        ):
            raise ValueError(f"sticky must be 'tenant' or 'header:NAME', got {self.sticky!r}")


class _Diffuser:
    """Deterministic error diffusion: True on about ``share`` of calls, evenly spread."""

    __slots__ = ("_acc", "share")

    def __init__(self, share: float) -> None:
        self.share = share
        self._acc = 0.0

    def __call__(self) -> bool:
        self._acc += self.share
        if self._acc >= 1.0 - 1e-12:
            self._acc -= 1.0
            return True
        return False


class Splitter:
    """Applies one :class:`Split`; its counters live as long as the split is unchanged."""

    def __init__(self, split: Split) -> None:
        self.split = split
        self._to_candidate = _Diffuser(split.weight)
        self._mirror = _Diffuser(split.mirror)
        sticky = split.sticky or ""
        self._header = sticky[len("header:") :].lower() if sticky.startswith("header:") else None

    def to_candidate(self, tenant: str, header: Header | None) -> bool:
        split = self.split
        if split.weight <= 0.0:
            return False
        if split.weight >= 1.0:
            return True
        if split.sticky is None:
            return self._to_candidate()
        key = f"tenant:{tenant}"
        if self._header is not None and header is not None:
            value = header(self._header)
            if value:
                key = f"header:{value}"
        return bucket(split.salt, key) < split.weight

    def mirror(self) -> bool:
        return self.split.mirror > 0.0 and self._mirror()


# -- windows -------------------------------------------------------------------

# Outcomes that say something about a version: success, or the server's own failure.
# Client errors (4xx) and cancellations (499, whether the client hung up or its own
# deadline cancelled the call) say nothing about the version that would have served
# them, and a 429 is the gateway's admission, not the model.
_ERROR_CODES = frozenset({"500", "503", "504"})
# A deadline expiry (504) is the version's error only when the request allowed at least
# this long; a shorter deadline is the client's choice (a tenant routed to the candidate
# by a sticky key could otherwise fail it at will). Rollouts set their own floor.
DEFAULT_MIN_DEADLINE_S = 1.0
_MAX_SAMPLES = 200_000
_rng = random.Random(0)


@dataclass
class VersionStats:
    """Live requests a version served in a window (successes and its own failures)."""

    requests: int = 0
    errors: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))  # seconds, successes
    # Deadline expiries of requests whose deadline was under the floor: not counted.
    short_deadlines: int = 0
    # Expiries, at or past the floor, of requests that never ran (their deadline passed
    # in the queue, behind their own tenant's backlog as likely as the version's
    # slowness): not counted either, or a tenant pinned to the candidate could fail it
    # by flooding its own sub-queue.
    queue_expiries: int = 0
    _successes: int = 0

    def add(self, ok: bool, seconds: float) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
            return
        self._successes += 1
        if len(self.latencies) < _MAX_SAMPLES:
            self.latencies.append(seconds)
        else:  # a uniform sample of the whole window (reservoir), not its first part
            slot = _rng.randrange(self._successes)
            if slot < _MAX_SAMPLES:
                self.latencies[slot] = seconds

    def merge(self, other: VersionStats) -> None:
        """Add another gateway's window of the same version to this one."""
        self.requests += other.requests
        self.errors += other.errors
        self.short_deadlines += other.short_deadlines
        self.queue_expiries += other.queue_expiries
        room = _MAX_SAMPLES - len(self.latencies)
        self.latencies.extend(other.latencies[:room])
        self._successes += min(room, len(other.latencies))
        for seconds in other.latencies[room:]:  # past the cap: the same reservoir
            self._successes += 1
            slot = _rng.randrange(self._successes)
            if slot < _MAX_SAMPLES:
                self.latencies[slot] = seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_ms(self) -> float | None:
        """p99 of successful requests' latency (None with no successes)."""
        if not self.latencies:
            return None
        p99 = float(np.percentile(np.frombuffer(self.latencies, dtype=np.float64), 99))
        return round(p99 * 1000, 3)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p99_ms": self.p99_ms,
            "short_deadline_expiries": self.short_deadlines,
            "queue_expiries": self.queue_expiries,
        }


@dataclass
class ShadowStats:
    """Candidate answers to mirrored requests, against production's answers."""

    requests: int = 0  # mirrored requests the candidate answered or failed
    compared: int = 0  # requests with both answers
    agreed: int = 0  # requests whose every row agreed
    rows: int = 0
    rows_agreed: int = 0
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    errors: int = 0  # the candidate failed the mirrored request
    # Not sent or not run: too many in flight, a full queue, or its deadline passed
    # while it waited behind clients' requests (which says nothing about the candidate).
    dropped: int = 0

    def merge(self, other: ShadowStats) -> None:
        """Add another gateway's window of the same candidate to this one."""
        for name in ("requests", "compared", "agreed", "rows", "rows_agreed", "errors", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.max_rel_diff = max(self.max_rel_diff, other.max_rel_diff)

    @property
    def agreement(self) -> float | None:
        """Share of compared rows that agreed."""
        return self.rows_agreed / self.rows if self.rows else None

    def summary(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "compared": self.compared,
            "agreement": self.agreement,
            "requests_agreed": self.agreed,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "errors": self.errors,
            "dropped": self.dropped,
        }


class Windows:
    """Per-version outcomes since the last :meth:`take`, for the models under rollout."""

    def __init__(self) -> None:
        self.watched: frozenset[str] = frozenset()
        # Per watched model, the shortest deadline whose expiry counts as an error
        # (DEFAULT_MIN_DEADLINE_S for a model without one).
        self.min_deadline_s: dict[str, float] = {}
        self._versions: dict[tuple[str, str], VersionStats] = {}
        self._shadow: dict[tuple[str, str], ShadowStats] = {}

    def record(
        self,
        model: str,
        version: str,
        code: str,
        seconds: float,
        deadline_s: float | None = None,
        ran: bool | None = None,
    ) -> None:
        """One live request's outcome (the router calls this for every request);
        ``deadline_s`` is the deadline it ran under (None: not known, judged by its code);
        ``ran``, for a 504, whether its batch had started on the version (None: not known,
        judged by its deadline alone)."""
        if model not in self.watched:
            return
        ok = code == "200"
        if not ok and code not in _ERROR_CODES:
            return
        stats = self._versions.get((model, version))
        if stats is None:
            stats = self._versions[(model, version)] = VersionStats()
        if code == "504":
            floor = self.min_deadline_s.get(model, DEFAULT_MIN_DEADLINE_S)
            if deadline_s is not None and deadline_s < floor:
                stats.short_deadlines += 1
                return
            if ran is False:
                stats.queue_expiries += 1
                return
        stats.add(ok, seconds)

    def shadow(self, model: str, version: str) -> ShadowStats:
        found = self._shadow.get((model, version))
        if found is None:
            found = self._shadow[(model, version)] = ShadowStats()
        return found

    def take(
        self, model: str, versions: tuple[str, str]
    ) -> tuple[VersionStats, VersionStats, ShadowStats]:
        """(production, candidate, shadow) since the last take, and start a new window."""
        prod, cand = versions
        out = (
            self._versions.pop((model, prod), None) or VersionStats(),
            self._versions.pop((model, cand), None) or VersionStats(),
            self._shadow.pop((model, cand), None) or ShadowStats(),
        )
        return out

    def merge(
        self,
        model: str,
        versions: tuple[str, str],
        taken: tuple[VersionStats, VersionStats, ShadowStats],
    ) -> None:
        """Add what another gateway's :meth:`take` returned to the open window."""
        prod, cand = versions
        for version, stats in ((prod, taken[0]), (cand, taken[1])):
            mine = self._versions.get((model, version))
            if mine is None:
                mine = self._versions[(model, version)] = VersionStats()
            mine.merge(stats)
        self.shadow(model, cand).merge(taken[2])

    def current(
        self, model: str, versions: tuple[str, str]
    ) -> tuple[VersionStats, VersionStats, ShadowStats]:
        """(production, candidate, shadow) so far in the window, which stays open."""
        prod, cand = versions
        return (
            self._versions.get((model, prod)) or VersionStats(),
            self._versions.get((model, cand)) or VersionStats(),
            self._shadow.get((model, cand)) or ShadowStats(),
        )


# -- comparison ----------------------------------------------------------------

RTOL = 1e-3
ATOL = 1e-5


def compare(
    production: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], stats: ShadowStats
) -> None:
    """Fold one mirrored request's answers into ``stats``.

    A row agrees when every output agrees: the arg-max class for a float output with
    more than one value per row (a classifier's scores), the values within
    ``ATOL + RTOL * |production|`` for other floats (a regressor), exact equality for
    integers, booleans and bytes. Max abs and rel differences cover every float value.
    """
    rows_ok: np.ndarray | None = None
    for name, want in production.items():
        got = candidate.get(name)
        if got is None or got.shape != want.shape:
            ok = np.zeros(want.shape[0] if want.ndim else 1, dtype=bool)
        elif want.dtype.kind == "f":
            a = want.astype(np.float64).reshape(want.shape[0], -1)
            b = got.astype(np.float64).reshape(want.shape[0], -1)
            diff = np.abs(a - b)
            if diff.size:
                stats.max_abs_diff = max(stats.max_abs_diff, float(diff.max()))
                rel = diff / np.maximum(np.abs(a), 1e-12)
                stats.max_rel_diff = max(stats.max_rel_diff, float(rel.max()))
            if a.shape[1] > 1:
                ok = a.argmax(axis=1) == b.argmax(axis=1)
            else:
                ok = np.all(diff <= ATOL + RTOL * np.abs(a), axis=1)
        else:
            ok = np.all(
                (want == got).reshape(want.shape[0], -1) if want.ndim else want == got, axis=-1
            )
        ok = np.atleast_1d(ok)
        rows_ok = ok if rows_ok is None else rows_ok & ok
    if rows_ok is None:
        return
    stats.compared += 1
    stats.rows += int(rows_ok.size)
    stats.rows_agreed += int(rows_ok.sum())
    stats.agreed += bool(rows_ok.all())
