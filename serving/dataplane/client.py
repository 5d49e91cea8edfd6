"""The gateway's end of the data plane: connections to each replica, one batch each."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from scheduler import BackendError, BackendUnavailableError, BatchResult, Share, Tensors
from serving.dataplane.auth import ClusterSecret, HandshakeError, prove
from serving.dataplane.codec import (
    ReplicaError,
    ReplicaStoppingError,
    decode_result,
    encode_batch,
    frame,
    read_frame,
)

log = logging.getLogger(__name__)

_DISCOVERY_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 5.0
# The replica answers the handshake from the loop that runs its forwards inline, so a
# new connection's handshake may wait for the forward running there, as its batch
# would have: a bound for a replica that hangs, not for one that is busy.
_HANDSHAKE_TIMEOUT_S = 120.0
# While fewer replicas are known than the version may have, discovery runs again after
# this long (Serve may route every discovery call of a round to the same replica), twice
# as long after each round that finds nothing new, up to the longer bound: an
# autoscaled version below its maximum keeps looking for the replicas Serve adds.
_SHORT_REFRESH_S = 0.2
_SHORT_REFRESH_MAX_S = 2.0


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_connection(address: str, secret: ClusterSecret) -> _Connection:
    """A connection to the replica at ``address`` on which both ends proved the secret."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port)), _CONNECT_TIMEOUT_S
    )
    try:
        await asyncio.wait_for(prove(reader, writer, secret, address), _HANDSHAKE_TIMEOUT_S)
    except BaseException:
        writer.close()
        raise
    return reader, writer


@dataclass(eq=False)
class _Replica:
    address: str
    secret: ClusterSecret
    idle: list[_Connection] = field(default_factory=list)
    in_flight: int = 0
    gone: bool = False
    last_answer_ns: int = 0  # when its latest answer arrived (perf_counter_ns)
    answered: int = 0  # batches it answered (statistics)
    picked: int = 0  # when it was last picked (a count of picks): ties go round
    closed_by_it: bool = False  # it closed a pooled connection: it stopped, or restarts

    async def connect(self) -> _Connection:
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            self.closed_by_it = True  # a new connection tells whether it is still up
            writer.close()
        return await open_connection(self.address, self.secret)

    def close(self) -> None:
        self.gone = True
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class DirectBatchBackend:
    """scheduler.Backend that sends batches straight to the replicas' data ports.

    ``discover`` asks Serve for one live replica's address (a handle call that Serve
    routes like any other); ``expected_replicas`` is how many the version may have (its
    ``replicas``, or autoscaling's maximum): while fewer are known, discovery runs again
    every 0.2-2 s, so replicas that Serve adds get batches. Batches go to the known
    replica with the fewest batches in flight (of those, the one picked longest ago). A
    batch whose replica turns out gone is tried on another known replica; with none left
    it fails as unavailable. A replica that is stopping (scaled down) answers a batch it
    will not run with a refusal: it is forgotten and the batch goes to another replica,
    found by asking Serve again if every known one was tried. Every connection starts
    with the handshake (serving.dataplane.auth): no batch goes to a port that did not
    prove ``secret``.
    """

    def __init__(
        self,
        discover: Callable[[], Awaitable[str]],
        secret: ClusterSecret,
        *,
        expected_replicas: int = 1,
        refresh_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._discover = discover
        self._secret = secret
        self._expected = max(1, expected_replicas)
        self._refresh_s = refresh_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._refreshed_at = -float("inf")
        self._short_refresh_s = _SHORT_REFRESH_S
        self._picks = 0
        self._refresh: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        return sorted(self._replicas)

    @property
    def answered(self) -> dict[str, int]:
        """Batches each known replica answered since it was found (statistics)."""
        return {a: r.answered for a, r in sorted(self._replicas.items())}

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        payload = frame(encode_batch(inputs, urgent, shares))
        tried: set[str] = set()
        refused = False  # the last replica tried was stopping
        while True:
            if self._closed:
                raise BackendUnavailableError("the model version is shutting down")
            replica = await self._pick(tried, ask_again=refused)
            tried.add(replica.address)
            replica.in_flight += 1
            conn: _Connection | None = None
            answered = False
            # Before connecting: a new connection's handshake waits for the forward
            # running at the replica, as a batch sent on a pooled one would.
            sent_ns = time.perf_counter_ns()
            try:
                conn = await replica.connect()
                reader, writer = conn
                writer.write(payload)
                data = await read_frame(reader)
                answered = True
                # The replica runs one batch at a time, in its order: an answer that came
                # back after this batch was sent was a batch ahead of it there, so until
                # then this one waited (its return transfer aside). For the statistics.
                answered_ns = time.perf_counter_ns()
                wait_ns = max(0, replica.last_answer_ns - sent_ns)
                replica.last_answer_ns = answered_ns
            except (TimeoutError, OSError, EOFError) as exc:
                # Refused, reset or closed mid-batch (IncompleteReadError is an EOFError),
                # or the port did not prove the cluster secret: a misconfiguration (or
                # worse) an operator must see, not a replica restarting. A replica that
                # had closed its connections itself has stopped (scaled down): routine.
                level = logging.WARNING
                if isinstance(exc, HandshakeError):
                    level = logging.ERROR
                elif replica.closed_by_it:
                    level = logging.INFO
                log.log(level, "replica %s unavailable: %s", replica.address, exc)
                self._forget(replica)
                refused = False
                if not any(a not in tried for a in self._replicas):
                    raise BackendUnavailableError("no model replica is available") from exc
                continue
            finally:
                replica.in_flight -= 1
                if conn is not None:
                    if answered and not replica.gone:
                        replica.idle.append(conn)
                    else:  # e.g. cancelled mid-batch: its answer would reach the next one
                        conn[1].close()
            try:
                result = decode_result(data)
            except ReplicaStoppingError:
                # Scaled down or replaced: it runs what it holds and takes nothing new.
                # The batch did not run; it goes to another replica.
                log.info("data plane: replica %s is stopping", replica.address)
                self._forget(replica)
                refused = True
                continue
            except ReplicaError as exc:
                # The detail (paths, model internals) goes to the log, not the caller.
                log.warning("batch failed on replica %s: %s", replica.address, exc)
                raise BackendError("the model failed to run the batch") from exc
            replica.answered += 1
            return dataclasses.replace(result, wait_ns=wait_ns)

    async def close(self) -> None:
        """Stop: no new batches; closes the connections (call after the batcher drained)."""
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        for replica in list(self._replicas.values()):
            self._forget(replica)

    # -- replica addresses ------------------------------------------------------

    async def _pick(self, tried: set[str], ask_again: bool = False) -> _Replica:
        """The known replica not in ``tried`` with the fewest batches in flight. With
        ``ask_again`` (the last one tried was stopping) and every known one tried, a new
        discovery round is awaited first: Serve routes it only to running replicas."""
        age = self._clock() - self._refreshed_at
        short = len(self._replicas) < self._expected and age > self._short_refresh_s
        stale = short or age > self._refresh_s
        if not self._replicas or stale:
            self._start_discovery()
        candidates = [r for r in self._replicas.values() if r.address not in tried]
        # After a refusal: the round under way may have begun before the replica stopped
        # (and found only it), so a second, new one follows if it finds nothing else.
        for _ in range(2 if ask_again else 1):
            if candidates:
                break
            if ask_again:
                self._start_discovery()
            if self._refresh is None:
                break
            try:
                await asyncio.shield(self._refresh)
            except Exception as exc:
                raise BackendUnavailableError("no model replica is available") from exc
            candidates = [r for r in self._replicas.values() if r.address not in tried]
        if not candidates:
            raise BackendUnavailableError("no model replica is available")
        # Of those with the fewest in flight, the one picked longest ago: a replica
        # found later (scaled up) gets batches even when there are fewer batches than
        # replicas, and the load spreads evenly.
        replica = min(candidates, key=lambda r: (r.in_flight, r.picked))
        self._picks += 1
        replica.picked = self._picks
        return replica

    def _start_discovery(self) -> None:
        """A discovery round, unless one is under way."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(
                self._discover_all(), name="gpugate-replica-discovery"
            )
            self._refresh.add_done_callback(_log_failure)

    async def _discover_all(self) -> None:
        # Serve spreads concurrent calls over its replicas; a few more calls than
        # replicas find every one with high probability, the next round the rest.
        n = max(self._expected, len(self._replicas))
        calls = 1 if n == 1 else 2 * n
        answers = await asyncio.wait_for(
            asyncio.gather(*(self._discover() for _ in range(calls)), return_exceptions=True),
            _DISCOVERY_TIMEOUT_S,
        )
        found = {a for a in answers if isinstance(a, str)}
        if not found:
            errors = [a for a in answers if isinstance(a, BaseException)]
            raise errors[0] if errors else RuntimeError("no replica answered")
        self._refreshed_at = self._clock()
        new = found - set(self._replicas)
        self._short_refresh_s = (
            _SHORT_REFRESH_S if new else min(2 * self._short_refresh_s, _SHORT_REFRESH_MAX_S)
        )
        for address in new:
            if self._closed:
                return
            self._replicas[address] = _Replica(address, self._secret)
            log.info("data plane: replica at %s", address)

    def _forget(self, replica: _Replica) -> None:
        replica.close()
        if self._replicas.get(replica.address) is replica:
            del self._replicas[replica.address]
            self._short_refresh_s = _SHORT_REFRESH_S  # replicas come and go: look again soon


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("data plane: replica discovery failed: %s", exc)
