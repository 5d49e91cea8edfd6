"""The protocol-neutral core of the router: authenticate, authorize, validate,
submit to the model version's batcher, map scheduler errors, and drain.

The HTTP and gRPC front doors only translate wire forms to and from calls on
:class:`InferenceService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router._exceptions import (
    DeadlineExceeded,
    GatewayError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from router.admission import TenantLoad, TenantLoads
from router.canary import SHADOW_PRIORITY, SHADOW_TENANT, Header, Windows, compare
from router.metrics import RouterMetrics
from router.pacing import RefusalHold
from router.quota import Quotas
from router.tensors import InferParams, InputTensor, validate_inputs
from router.tracing import finish_request_span, span_context, start_request_span
from router.types import MAX_PRIORITY_LEVEL, ModelSignature, Tenant
from scheduler import (
    BackendError,
    BackendUnavailableError,
    DeadlineExceededError,
    ModelBatcher,
    QueueFullError,
    Receipt,
    SchedulerClosedError,
    Tensors,
    VersionStats,
)

SERVER_NAME = "gpugate"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
PLATFORM = "pytorch_libtorch"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    signature: ModelSignature
    batcher: ModelBatcher
    replicas: int = 1  # for the model configuration's instance group
    gpus_per_replica: float = 0.0


@dataclass
class Call:
    """One admitted inference call; its metric labels are filled in as they are known.

    Labels come from resolved names only, so a client cannot mint new series.
    """

    tenant: Tenant | None = None
    model: str = "-"
    version: str = "-"
    receipt: Receipt = field(default_factory=Receipt)
    trace: object | None = None  # the request span's context, for the batch span's link
    stats: VersionStats | None = None  # the resolved version's, for its outcome
    timeout_s: float | None = None  # the deadline the request ran under, once known
    # For a deadline expiry: whether its batch had started on the version (False: it
    # expired in the queue, which the canary's analysis does not hold against the version).
    ran: bool | None = None
    # What the call holds of its tenant's in-flight caps (released when it ends).
    load: TenantLoad | None = None
    held_bytes: int = 0


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY | UNAVAILABLE
    reason: str = ""


class ModelTable(Protocol):
    """Which versions serve; ``serving`` supplies it (static now, registry-driven later)."""

    def resolve(self, name: str, version: str | None) -> ServedModel:
        """The named version, or the version that serves ``name`` by default."""
        ...

    def route(
        self, name: str, version: str | None, tenant: str, header: Header | None = None
    ) -> tuple[ServedModel, ServedModel | None]:
        """The version that serves a tenant's request, and one to mirror it to, if any."""
        ...

    def index(self) -> list[IndexEntry]:
        """Every version, ordered by name then version."""
        ...

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, oldest first."""
        ...

    def serving(self, name: str | None = None) -> list[ServedModel]:
        """The versions that take requests, of ``name`` or of every model, in index order."""
        ...


class TenantDirectory(Protocol):
    async def authenticate(self, api_key: str) -> Tenant | None: ...


def version_order(version: str) -> tuple[int, int, str]:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


@dataclass(frozen=True)
class RouterSettings:
    max_request_bytes: int = 64 * 2**20
    default_timeout_s: float = 30.0
    # Mirrored (shadow) requests in flight at once; more are dropped and counted.
    max_shadow_in_flight: int = 64
    # Per tenant over every model, unless the tenant's record says otherwise: requests
    # admitted and not yet answered, and the bytes of their input tensors. Past either,
    # 429 / RESOURCE_EXHAUSTED, so one tenant cannot take the gateway's memory or queues.
    tenant_max_requests_in_flight: int = 512
    tenant_max_bytes_in_flight: int = 256 * 2**20
    # What a refusal for load tells the client to wait (Retry-After).
    retry_after_s: float = 1.0
    # How long a gRPC ModelInfer's message may take to arrive once its caller is admitted
    # (the call's own deadline, when shorter, applies instead).
    grpc_body_timeout_s: float = 30.0
    # How long a gRPC ModelInfer refused for load waits before its answer, so that a
    # client that calls again at once, ignoring the retry delay, cannot make the gateway
    # read and refuse its calls as fast as it sends them (router/pacing.py); at most this
    # many answers of one tenant wait at once. 0 answers at once.
    refusal_hold_s: float = 0.25
    refusal_hold_max_per_tenant: int = 64


class InferenceService:
    def __init__(
        self,
        models: ModelTable,
        tenants: TenantDirectory,
        settings: RouterSettings,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics or RouterMetrics(None)
        self._tenants = tenants
        self._draining = False
        # False until the gateway is told what to serve (a gateway that starts with no
        # models is not ready, so a load balancer sends it nothing yet).
        self.has_models = True
        self._in_flight = 0
        self.metrics.requests_in_flight.set_function(lambda: self._in_flight)
        self._idle = asyncio.Event()
        self._idle.set()
        self._loads = TenantLoads(
            settings.tenant_max_requests_in_flight,
            settings.tenant_max_bytes_in_flight,
            settings.retry_after_s,
            self.metrics,
        )
        self.refusals = RefusalHold(settings.refusal_hold_s, settings.refusal_hold_max_per_tenant)
        self.metrics.refusals_held.set_function(self.refusals.total)
        # Rate quotas; a gateway among several sets its shares (router.quota).
        self.quotas = Quotas(self.metrics)
        # Outcomes per version for the models under a rollout (serving.rollout reads them).
        self.windows = Windows()
        self._shadows: set[asyncio.Task[None]] = set()

    # -- health -----------------------------------------------------------------

    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        return self.has_models and not self._draining

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self.models.resolve(name, version)
        except NotFound:
            return False
        return not self._draining

    # -- requests ---------------------------------------------------------------

    async def authenticate(self, call: Call, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` value; called before decoding,
        so an unauthenticated caller costs no parsing."""
        call.tenant = await self._authenticate(authorization)
        return call.tenant

    async def identify(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` value, suspended or not: for
        what a tenant may read about itself, such as why it is suspended."""
        return await self._authenticate(authorization, suspended_too=True)

    async def _authenticate(self, authorization: str | None, suspended_too: bool = False) -> Tenant:
        if not authorization:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed Authorization: expected 'Bearer <key>'")
        try:
            tenant = await self._tenants.authenticate(key.strip())
        except Exception:
            # The directory's store failed (e.g. the database is down): not the caller's
            # fault and not a bad key. The cause stays in the log, not in the answer.
            log.exception("tenant directory failed")
            raise Unavailable("cannot authenticate now: tenant directory unavailable") from None
        if tenant is None:
            raise Unauthenticated("unknown API key")
        if tenant.suspended is not None and not suspended_too:
            raise PermissionDenied(f"tenant {tenant.name!r} is suspended: {tenant.suspended}")
        return tenant

    async def infer(
        self,
        call: Call,
        model_name: str,
        version: str | None,
        inputs: Sequence[InputTensor],
        params: InferParams,
        *,
        requested_outputs: Sequence[str] = (),
        transport_timeout_s: float | None = None,
        header: Header | None = None,
    ) -> tuple[ServedModel, Tensors]:
        """Run one authenticated request; raises GatewayError subclasses only.

        ``header`` looks up a request header (gRPC metadata) by lower-case name, for a
        rollout that routes on one.
        """
        tenant = call.tenant
        assert tenant is not None, "authenticate the call first"
        served, shadow = self.models.route(model_name, version, tenant.name, header)
        call.model, call.version = served.name, served.version
        if not tenant.may_use(served.name):
            raise PermissionDenied(f"tenant {tenant.name!r} may not use model {served.name!r}")
        if not tenant.may_ask(params.priority):
            self.metrics.refused(tenant.name, "priority")
            granted = ", ".join(str(p) for p in sorted(tenant.priorities))
            raise PermissionDenied(
                f"tenant {tenant.name!r} may not use priority level {params.priority} "
                f"(granted levels: {granted})"
            )
        call.stats = served.batcher.stats  # a refused tenant's call is not the model's failure
        unknown = [o for o in requested_outputs if o not in served.signature.output_names]
        if unknown:
            raise InvalidArgument(f"unknown output(s) requested: {', '.join(unknown)}")
        self.admit(call)
        arrays, rows = validate_inputs(
            served.signature,
            inputs,
            self.settings.max_request_bytes,
            reserve=lambda size: self._admit_bytes(call, tenant, size),
        )
        if tenant.quota.rows is not None or tenant.model_quotas:
            self._take_quotas(tenant, served.name, rows)
        timeouts = [t for t in (params.timeout_s, transport_timeout_s) if t is not None]
        timeout_s = min(timeouts) if timeouts else self.settings.default_timeout_s
        call.timeout_s = timeout_s
        priority = MAX_PRIORITY_LEVEL if tenant.demoted else params.priority
        outputs = await self._submit(served, call, arrays, rows, priority, timeout_s)
        if shadow is not None:
            self._mirror(call, shadow, arrays, rows, outputs, timeout_s)
        if requested_outputs:
            outputs = {k: outputs[k] for k in requested_outputs}
        return served, outputs

    # -- tenant admission ---------------------------------------------------------

    def admit(self, call: Call) -> None:
        """Take one of the authenticated tenant's in-flight requests, or refuse (429); the
        call holds it until :meth:`admitted` ends, whatever the outcome.

        :meth:`infer` admits a call that is not admitted yet; a front door admits before
        it reads the body with :meth:`hold` (or with this, inside :meth:`admitted`).
        """
        tenant = call.tenant
        assert tenant is not None, "authenticate the call first"
        if call.load is None:  # else admitted already (by the front door)
            if tenant.over_budget is not None:
                self.metrics.refused(tenant.name, "budget")
                raise PermissionDenied(
                    f"tenant {tenant.name!r}: budget exhausted: {tenant.over_budget}"
                )
            load = self._loads.take_request(tenant)
            if tenant.quota.requests is not None:
                try:
                    self.quotas.take(tenant.name, "", "requests", tenant.quota.requests, 1)
                except GatewayError:
                    self._loads.give_back(tenant.name, load, 1, 0)
                    raise
            call.load = load

    def _take_quotas(self, tenant: Tenant, model: str, rows: int) -> None:
        """The quotas known once the model and the rows are: the model's request quota,
        and the rows quotas over every model and of the model."""
        quotas, own = self.quotas, tenant.quota_of(model)
        quotas.take(tenant.name, model, "requests", own.requests, 1)
        quotas.take(tenant.name, "", "rows", tenant.quota.rows, rows)
        quotas.take(tenant.name, model, "rows", own.rows, rows)

    def hold(self, tenant: Tenant) -> Call:
        """Take one of ``tenant``'s in-flight requests for a body still to be read, or
        refuse (429), outside :meth:`admitted`.

        A front door calls this once the key is checked and before it reads the body, so
        that bodies being read count against the tenant's request cap (a tenant holds at
        most ``max_requests_in_flight`` bodies in memory, and a caller that never
        finishes its body holds only its own tenant's slots), while a call that ends
        before its body is in (a reset) still never reaches the service's counts. Pass
        the returned call to :meth:`admitted` (``held``), which takes the slot over, and
        :meth:`release` it on every path that does not get there.
        """
        call = Call(tenant=tenant)
        self.admit(call)
        return call

    def release(self, held: Call) -> None:
        """Give back what :meth:`hold` took, unless :meth:`admitted` took it over."""
        self._release(held)

    def _admit_bytes(self, call: Call, tenant: Tenant, size: int) -> None:
        """Hold exactly ``size`` bytes of the tenant's in-flight budget for the call (more
        or fewer than it holds now) before any array is built."""
        assert call.load is not None, "admit the request first"
        self._loads.take_bytes(tenant, call.load, call.held_bytes, size)
        call.held_bytes = size

    def _release(self, call: Call) -> None:
        load, tenant = call.load, call.tenant
        if load is None or tenant is None:
            return
        call.load = None
        self._loads.give_back(tenant.name, load, 1, call.held_bytes)
        call.held_bytes = 0

    def tenant_load(self, tenant: str) -> TenantLoad:
        """A copy of the tenant's in-flight requests and bytes now (zero when idle)."""
        return self._loads.load(tenant)

    async def _submit(
        self,
        served: ServedModel,
        call: Call,
        arrays: Tensors,
        rows: int,
        priority: int,
        timeout_s: float,
    ) -> Tensors:
        tenant = call.tenant
        assert tenant is not None
        try:
            return await served.batcher.submit(
                tenant.name,
                arrays,
                rows,
                weight=tenant.weight,
                priority=priority,
                timeout_s=timeout_s,
                receipt=call.receipt,
                trace=call.trace,
            )
        except QueueFullError as exc:
            self.metrics.refused(tenant.name, "queue_full")
            raise ResourceExhausted(str(exc), retry_after_s=self.settings.retry_after_s) from None
        except DeadlineExceededError as exc:
            call.ran = exc.ran
            raise DeadlineExceeded(str(exc)) from None
        except SchedulerClosedError as exc:
            raise Unavailable(str(exc)) from None
        except BackendUnavailableError as exc:
            raise Unavailable(f"model {served.name} version {served.version}: {exc}") from None
        except BackendError as exc:
            raise Internal(f"model {served.name} version {served.version} failed: {exc}") from None

    def _mirror(
        self,
        call: Call,
        target: ServedModel,
        arrays: Tensors,
        rows: int,
        answer: Tensors,
        timeout_s: float,
    ) -> None:
        """Send a copy to the candidate after production answered; never awaited by the
        caller, queued behind every client's request, billed to the shadow owner.

        The copy keeps the caller's arrays, so it keeps their bytes on the tenant's
        in-flight budget until it ends: mirroring never takes memory the byte cap does
        not see."""
        if len(self._shadows) >= self.settings.max_shadow_in_flight or (
            rows > target.signature.max_batch_size
        ):
            self.windows.shadow(target.name, target.version).dropped += 1
            self.metrics.shadow_requests.labels(target.name, target.version, "dropped").inc()
            return
        load, tenant, held = call.load, call.tenant, call.held_bytes
        call.held_bytes = 0  # now the copy's, released when it ends
        task = asyncio.get_running_loop().create_task(
            self._shadow(target, arrays, rows, answer, timeout_s)
        )
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)
        if load is not None and tenant is not None and held:
            task.add_done_callback(lambda _: self._loads.give_back(tenant.name, load, 0, held))

    async def _shadow(
        self, target: ServedModel, arrays: Tensors, rows: int, answer: Tensors, timeout_s: float
    ) -> None:
        outcome = "compared"
        got: Tensors | None = None
        started = time.perf_counter()
        try:
            got = await target.batcher.submit(
                SHADOW_TENANT,
                arrays,
                rows,
                priority=SHADOW_PRIORITY,
                timeout_s=timeout_s,
                lane=False,  # mirrored work never goes past anyone's batch
            )
        except (QueueFullError, DeadlineExceededError, SchedulerClosedError):
            outcome = "dropped"  # it never ran: nothing learnt about the candidate
        except (BackendError, BackendUnavailableError):
            outcome = "error"
        except Exception:
            log.exception("shadow request to %s:%s failed", target.name, target.version)
            outcome = "error"
        # The candidate's statistics count the copy as a request it served (or failed),
        # so its request and batch counts agree (tests/integration/test_rollouts.py).
        target.batcher.stats.record_request(
            got is not None, round((time.perf_counter() - started) * 1e9)
        )
        # Looked up after the wait: the window may have turned over meanwhile.
        stats = self.windows.shadow(target.name, target.version)
        if outcome == "dropped":
            stats.dropped += 1
        else:
            stats.requests += 1
            if outcome == "error":
                stats.errors += 1
            else:
                assert got is not None
                try:
                    compare(answer, got, stats)
                except Exception:
                    log.exception("comparing shadow answers of %s:%s", target.name, target.version)
                    outcome = "error"
                    stats.errors += 1
        self.metrics.shadow_requests.labels(target.name, target.version, outcome).inc()

    async def cancel_shadows(self) -> None:
        """Stop mirrored work (drain): a queued copy leaves its queue, none is billed."""
        tasks = list(self._shadows)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- draining ---------------------------------------------------------------

    @contextlib.contextmanager
    def admitted(
        self,
        span_name: str = "infer",
        carrier: Mapping[str, str] | None = None,
        held: Call | None = None,
    ) -> Iterator[Call]:
        """Wrap a whole inference call, from before authentication to the response.

        Draining refuses here (503 / UNAVAILABLE) and waits for everything admitted,
        so no request is cut off between the front door and the batcher. Every outcome,
        including a decoding error, is counted and traced here once (``carrier``: the
        request's headers, for an incoming ``traceparent``), and anything unexpected
        becomes a 500 / INTERNAL without its details.
        """
        if self._draining or not self.has_models:
            self.metrics.observe_request("-", "-", "-", "503", 0.0)
            raise Unavailable("server is draining" if self._draining else "server is starting")
        started = time.perf_counter()
        span = start_request_span(span_name, carrier)
        call = Call(trace=span_context(span))
        if held is not None and held.load is not None:
            # The front door's hold becomes this call's (released when it ends).
            call.load, call.held_bytes = held.load, held.held_bytes
            held.load, held.held_bytes = None, 0
        code = "200"
        error: str | None = None
        self._in_flight += 1
        self._idle.clear()
        try:
            yield call
        except GatewayError as exc:
            code, error = str(exc.http_status), str(exc)
            raise
        except asyncio.CancelledError:
            code, error = "499", "cancelled"  # the caller went away or its deadline passed
            raise
        except Exception as exc:
            code, error = "500", type(exc).__name__
            log.exception("request for model %r failed unexpectedly", call.model)
            raise Internal(f"internal error: {type(exc).__name__}") from None
        finally:
            self._release(call)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            tenant = call.tenant.name if call.tenant else "-"
            elapsed = time.perf_counter() - started
            if call.stats is not None:
                call.stats.record_request(code == "200", round(elapsed * 1e9))
            self.metrics.observe_request(call.model, call.version, tenant, code, elapsed)
            self.windows.record(call.model, call.version, code, elapsed, call.timeout_s, call.ran)
            finish_request_span(
                span,
                tenant=tenant,
                model=call.model,
                version=call.version,
                code=code,
                receipt=call.receipt,
                error=error,
            )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait for the in-flight ones; True if all finished."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
