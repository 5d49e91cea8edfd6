"""Locust load test of a gpugate gateway: tenants, protocols, load shapes, an SLO gate.

    locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 60s --host http://127.0.0.1:8000

With no configuration the gateway's demo tenant (its key from ./.gpugate) calls
the demo model. Tenants, keys, weights, request mixes, SLOs and the shape come
from ``GPUGATE_LOCUST_CONFIG`` (a YAML/JSON file, see ``tenants.example.yaml``)
and/or ``GPUGATE_LOCUST_*`` environment variables: see loadtests/README.md.

For each tenant this defines up to two Locust users, ``<tenant>_http`` (KServe v2
JSON and Triton's binary tensor extension, by the tenant's mix) and
``<tenant>_grpc`` (``ModelInfer`` over a blocking gRPC channel, each call fired as
a Locust request event). Stats entries are one per protocol, model and tenant,
e.g. ``grpc infer digits [tenant-a]``, so the console, web UI, ``--csv`` and
``--html`` reports all show tenants apart. When Locust quits, tenants' SLOs are
checked; a broken one is logged naming the tenant and figure, and the exit code
is 3.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from typing import Any, ClassVar

import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, constant_throughput, events, task
from locust.runners import WorkerRunner

# Importing Locust monkey-patched the standard library with gevent; gRPC must be
# switched to gevent after that and before any channel exists.
grpc_gevent.init_gevent()

# The module, not its classes: Locust would take any LoadTestShape class found in
# this namespace as the shape of every run.
import locust_shapes  # noqa: E402
from locust_config import PROTOCOLS, LoadConfig, LoadConfigError, TenantLoad, load_config  # noqa: E402
from locust_kserve import (  # noqa: E402
    GrpcInferClient,
    ModelInfo,
    binary_body,
    check_http_response,
    fetch_model_info,
    json_body,
    make_inputs,
)
from locust_slo import SLO_EXIT_CODE, check_slos, failures_covered  # noqa: E402

log = logging.getLogger("gpugate.loadtest")

try:
    CONFIG: LoadConfig = load_config()
except LoadConfigError as exc:
    sys.stderr.write(f"gpugate loadtest: error: {exc}\n")
    sys.exit(2)

_MODELS: dict[tuple[str, str | None], ModelInfo] = {}


def model_info(host: str | None, tenant: TenantLoad) -> ModelInfo:
    """The tenant's model's metadata, read once per model over the (open) HTTP API."""
    model, version = CONFIG.model_of(tenant)
    if (model, version) not in _MODELS:
        _MODELS[(model, version)] = fetch_model_info(
            host or CONFIG.http, model, version, CONFIG.timeout_s
        )
    return _MODELS[(model, version)]


def entry_name(kind: str, info: ModelInfo, tenant: str) -> str:
    label = f"{info.name}:{info.version}" if info.version else info.name
    return f"{kind} infer {label} [{tenant}]"


def _wait_time(tenant: TenantLoad) -> Any:
    rate = CONFIG.rate_of(tenant)
    return constant_throughput(rate) if rate > 0 else constant(0)


# ------------------------------------------------------------------------ users


class TenantHttpUser(FastHttpUser):
    """One tenant's HTTP traffic: KServe v2 JSON and binary-extension requests."""

    abstract = True
    tenant: ClassVar[TenantLoad]
    host = CONFIG.http

    def on_start(self) -> None:
        tenant = self.tenant
        info = model_info(self.host, tenant)
        inputs = make_inputs(info, tenant.rows, seed=id(self) & 0xFFFF)
        key = tenant.key(os.environ)
        self._path = f"{info.path}/infer"
        self._json = json_body(inputs)
        self._binary, header_length = binary_body(info, inputs)
        self._json_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._binary_headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        }
        self._json_name = entry_name("http-json", info, tenant.name)
        self._binary_name = entry_name("http-binary", info, tenant.name)

    def _post(self, body: bytes, headers: dict[str, str], name: str) -> None:
        with self.client.post(
            self._path,
            data=body,
            headers=headers,
            name=name,
            catch_response=True,
            context={"tenant": self.tenant.name},
        ) as resp:
            if resp.status_code != 200:
                text = (resp.content or b"")[:200].decode(errors="replace")
                resp.failure(f"HTTP {resp.status_code}: {text}")
                return
            problem = check_http_response(
                resp.content or b"",
                resp.headers.get("Inference-Header-Content-Length"),
                self.tenant.rows,
            )
            if problem is not None:
                resp.failure(problem)
            else:
                resp.success()

    def infer_json(self) -> None:
        self._post(self._json, self._json_headers, self._json_name)

    def infer_binary(self) -> None:
        self._post(self._binary, self._binary_headers, self._binary_name)


class TenantGrpcUser(User):
    """One tenant's gRPC traffic; calls reach Locust's stats through request events."""

    abstract = True
    tenant: ClassVar[TenantLoad]
    host = CONFIG.http

    def on_start(self) -> None:
        tenant = self.tenant
        info = model_info(self.host, tenant)
        inputs = make_inputs(info, tenant.rows, seed=id(self) & 0xFFFF)
        self._key = tenant.key(os.environ)
        self._request = GrpcInferClient.request(info, inputs)
        self._name = entry_name("grpc", info, tenant.name)
        self._client = GrpcInferClient(
            CONFIG.grpc_target(self.host), self.environment.events.request.fire, CONFIG.timeout_s
        )

    def on_stop(self) -> None:
        if hasattr(self, "_client"):
            self._client.close()

    @task
    def infer(self) -> None:
        self._client.infer(self._name, self._request, self._key, self.tenant.rows, self.tenant.name)


def _split(total: int, shares: dict[str, float]) -> dict[str, int]:
    """``total`` users over ``shares`` by largest remainder."""
    whole = sum(shares.values())
    exact = {k: total * v / whole for k, v in shares.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: exact[k] - out[k], reverse=True)
    for k in by_remainder[: total - sum(out.values())]:
        out[k] += 1
    return out


def _task_weights(mix: dict[str, float]) -> dict[str, int]:
    """Integer task weights in the mix's proportions (Locust needs ints)."""
    return {k: max(1, round(v * 1000)) for k, v in mix.items() if v > 0}


def _user_classes(config: LoadConfig) -> dict[str, type[User]]:
    classes: dict[str, type[User]] = {}
    noisy = config.heavy_tenant().name if config.shape == "noisy-neighbour" else None
    for tenant in config.tenants:
        mix = {p: tenant.mix.get(p, 0.0) for p in PROTOCOLS}
        shares = {"http": mix["http_json"] + mix["http_binary"], "grpc": mix["grpc"]}
        shares = {k: v for k, v in shares.items() if v > 0}
        fixed = tenant.users
        if fixed is None and noisy is not None and tenant.name != noisy:
            fixed = len(shares)  # a light tenant needs a fixed presence in this shape
        counts = _split(fixed, shares) if fixed is not None else None
        ident = re.sub(r"\W", "_", tenant.name)
        for transport, share in shares.items():
            if counts is not None and counts[transport] == 0:
                continue
            attrs: dict[str, Any] = {
                "tenant": tenant,
                "wait_time": _wait_time(tenant),
                "weight": max(1, round(tenant.weight * share * 100)),
                "fixed_count": counts[transport] if counts is not None else 0,
                "__module__": __name__,
            }
            if transport == "http":
                weights = _task_weights({k: mix[k] for k in ("http_json", "http_binary")})
                attrs["tasks"] = {
                    getattr(TenantHttpUser, f"infer_{k[5:]}"): w for k, w in weights.items()
                }
                base: type[User] = TenantHttpUser
            else:
                base = TenantGrpcUser
            name = f"{ident}_{transport}"
            if name in classes:
                raise LoadConfigError(f"tenant names {tenant.name!r} clash as {name}")
            classes[name] = type(base)(name, (base,), attrs)
    return classes


try:
    USER_CLASSES = _user_classes(CONFIG)
except LoadConfigError as exc:
    sys.stderr.write(f"gpugate loadtest: error: {exc}\n")
    sys.exit(2)
globals().update(USER_CLASSES)

# --------------------------------------------------------------------- the shape

_RECORDER: locust_shapes.PhaseRecorder | None = None
if CONFIG.shape is not None:
    _shape = locust_shapes.SHAPES[CONFIG.shape]
    if _shape is locust_shapes.NoisyNeighbourShape:
        heavy = CONFIG.heavy_tenant().name
        light = [t.name for t in CONFIG.tenants if t.name != heavy]
        _RECORDER = locust_shapes.PhaseRecorder(light)
        locust_shapes.NoisyNeighbourShape.light_classes = [
            c for c in USER_CLASSES.values() if c.tenant.name != heavy
        ]
        locust_shapes.NoisyNeighbourShape.all_classes = list(USER_CLASSES.values())
        locust_shapes.NoisyNeighbourShape.recorder = _RECORDER
        events.request.add_listener(_RECORDER.on_request)
    # Locust uses the one LoadTestShape subclass it finds in this module.
    globals()["ScenarioShape"] = type("ScenarioShape", (_shape,), {"__module__": __name__})


# ---------------------------------------------------------------------- the gate


@events.quitting.add_listener
def _slo_gate(environment: Any, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master holds the whole run's stats
    if _RECORDER is not None:
        for line in _RECORDER.summary():
            log.info(line)
    if not any(t.slo for t in CONFIG.tenants):
        return
    breaches, passes = check_slos(CONFIG, environment.stats)
    for line in passes:
        log.info(f"SLO met: {line}")
    for line in breaches:
        log.error(f"SLO broken: {line}")
    if breaches:
        environment.process_exit_code = SLO_EXIT_CODE
    elif (
        environment.runner is not None
        and not environment.runner.exceptions
        and failures_covered(CONFIG, environment.stats)
    ):
        # Failures within every tenant's error-rate SLO pass the gate; Locust alone
        # would exit 1 on any failure.
        environment.process_exit_code = 0
