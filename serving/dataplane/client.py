"""The gateway's end of the data plane: connections to each replica, one batch each."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from scheduler import BackendError, BackendUnavailableError, BatchResult, Tensors
from serving.dataplane.auth import ClusterSecret, HandshakeError, prove
from serving.dataplane.codec import ReplicaError, decode_result, encode_batch, frame, read_frame

log = logging.getLogger(__name__)

_DISCOVERY_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 5.0
# The replica answers the handshake from the loop that runs its forwards inline, so a
# new connection's handshake may wait for the forward running there, as its batch
# would have: a bound for a replica that hangs, not for one that is busy.
_HANDSHAKE_TIMEOUT_S = 120.0
# While fewer replicas are known than the version has, discovery runs again this often
# (Serve may route every discovery call of a round to the same replica).
_SHORT_REFRESH_S = 0.2


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

    async def connect(self) -> _Connection:
        if self.idle:
            return self.idle.pop()
        return await open_connection(self.address, self.secret)

    def close(self) -> None:
        self.gone = True
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class DirectBatchBackend:
    """scheduler.Backend that sends batches straight to the replicas' data ports.

    ``discover`` asks Serve for one live replica's address (a handle call that Serve
    routes like any other). Batches go to the known replica with the fewest batches
    in flight. A batch whose replica turns out gone is tried once more on another
    known replica; with none left it fails as unavailable. Every connection starts
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
        self._refresh: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        return sorted(self._replicas)

    async def run_batch(self, inputs: Tensors, *, urgent: bool = False) -> BatchResult:
        payload = frame(encode_batch(inputs, urgent))
        tried: set[str] = set()
        while True:
            if self._closed:
                raise BackendUnavailableError("the model version is shutting down")
            replica = await self._pick(tried)
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
                # worse) an operator must see, not a replica restarting.
                level = logging.ERROR if isinstance(exc, HandshakeError) else logging.WARNING
                log.log(level, "replica %s unavailable: %s", replica.address, exc)
                self._forget(replica)
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
                return dataclasses.replace(decode_result(data), wait_ns=wait_ns)
            except ReplicaError as exc:
                # The detail (paths, model internals) goes to the log, not the caller.
                log.warning("batch failed on replica %s: %s", replica.address, exc)
                raise BackendError("the model failed to run the batch") from exc

    async def close(self) -> None:
        """Stop: no new batches; closes the connections (call after the batcher drained)."""
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        for replica in list(self._replicas.values()):
            self._forget(replica)

    # -- replica addresses ------------------------------------------------------

    async def _pick(self, tried: set[str]) -> _Replica:
        age = self._clock() - self._refreshed_at
        short = len(self._replicas) < self._expected and age > _SHORT_REFRESH_S
        stale = short or age > self._refresh_s
        if (not self._replicas or stale) and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(
                self._discover_all(), name="gpugate-replica-discovery"
            )
            self._refresh.add_done_callback(_log_failure)
        candidates = [r for r in self._replicas.values() if r.address not in tried]
        if not candidates and self._refresh is not None:
            try:
                await asyncio.shield(self._refresh)
            except Exception as exc:
                raise BackendUnavailableError("no model replica is available") from exc
            candidates = [r for r in self._replicas.values() if r.address not in tried]
        if not candidates:
            raise BackendUnavailableError("no model replica is available")
        return min(candidates, key=lambda r: r.in_flight)

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
        for address in found - set(self._replicas):
            if self._closed:
                return
            self._replicas[address] = _Replica(address, self._secret)
            log.info("data plane: replica at %s", address)

    def _forget(self, replica: _Replica) -> None:
        replica.close()
        if self._replicas.get(replica.address) is replica:
            del self._replicas[replica.address]


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("data plane: replica discovery failed: %s", exc)
