"""Cost attribution end to end: a real gateway, real clients, a real OTLP receiver,
the real ledger file, and `kill -9` under load."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Gateway, free_port, start_gateway

pytestmark = pytest.mark.timeout(400)

PRICE_PER_HOUR = 3.6  # 0.000001 per device-ms: easy to check by hand
CONFIG = f"""
costs:
  currency: EUR
  reservation_heartbeat_s: 0.5
  prices:
    - {{device: cpu, per_hour: {PRICE_PER_HOUR}}}
"""
X = np.random.default_rng(0).random((64, 64), dtype=np.float32) * 16


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[object, ...]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if predicate(s)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError("span not received")


def attrs(span) -> dict[str, object]:  # type: ignore[no-untyped-def]
    out: dict[str, object] = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rec = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield rec, port
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory, receiver: tuple[Receiver, int]
) -> Iterator[Gateway]:
    state = tmp_path_factory.mktemp("costs")
    config = state / "gpugate.yaml"
    config.write_text(CONFIG)
    gw = start_gateway(
        state,
        "--config",
        str(config),
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver[1]}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        yield gw
    finally:
        gw.close()


def _http(gw: Gateway, key: str, rows: int, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    client = thttp.InferenceServerClient(gw.http_url)
    inp = thttp.InferInput("pixels", [rows, 64], "FP32")
    inp.set_data_from_numpy(X[:rows])
    return client.infer(
        "digits", [inp], headers={"Authorization": f"Bearer {key}", **(headers or {})}
    )


def _grpc(gw: Gateway, key: str, rows: int, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    client = tgrpc.InferenceServerClient(gw.grpc_url)
    inp = tgrpc.InferInput("pixels", [rows, 64], "FP32")
    inp.set_data_from_numpy(X[:rows])
    return client.infer(
        "digits", [inp], headers={"authorization": f"Bearer {key}", **(headers or {})}
    )


@pytest.mark.parametrize("send", [_http, _grpc], ids=["http", "grpc"])
def test_spans_reach_a_real_otlp_receiver_with_the_callers_trace_and_batch_links(
    traced: Gateway, receiver: tuple[Receiver, int], send
) -> None:  # type: ignore[no-untyped-def]
    rec, _ = receiver
    trace_id = os.urandom(16)
    parent = os.urandom(8)
    traceparent = f"00-{trace_id.hex()}-{parent.hex()}-01"
    send(traced, traced.demo_key, 3, {"traceparent": traceparent})

    server = rec.wait_for(lambda s: s.trace_id == trace_id)[0]
    assert server.parent_span_id == parent  # continues the caller's trace
    assert server.kind == 2  # SPAN_KIND_SERVER
    a = attrs(server)
    assert a["gpugate.tenant"] == "demo"
    assert a["gpugate.model"] == "digits" and a["gpugate.model_version"] == "1"
    assert a["gpugate.batch.size"] >= 3
    assert a["gpugate.device_seconds"] > 0
    assert a["gpugate.cost_usd"] == pytest.approx(a["gpugate.device_seconds"] / 1000, rel=1e-6)
    assert "gpugate.queue_wait_seconds" in a

    batch = rec.wait_for(lambda s: any(link.span_id == server.span_id for link in s.links))[0]
    assert batch.trace_id != trace_id  # a batch is a root of its own, linked to requests
    b = attrs(batch)
    assert b["gpugate.batch.size"] >= 3
    assert b["gpugate.device_seconds"] >= a["gpugate.device_seconds"]


def _report(gw: Gateway, day: str, group_by: str, fmt: str) -> subprocess.CompletedProcess[str]:
    return gw.cli(
        "costs", "report", "--from", day, "--to", day, "--group-by", group_by, "--format", fmt
    )  # fmt: skip


def test_costs_report_reconciles_with_the_ledger_and_the_metrics(traced: Gateway) -> None:
    created = traced.cli("tenants", "create", "finance-e2e", "--json")
    assert created.returncode == 0, created.stderr
    other = json.loads(created.stdout)["api_key"]
    before = Counter[str]()
    for i in range(30):
        _grpc(traced, traced.demo_key if i % 3 else other, 1 + i % 4)
        before["demo" if i % 3 else "finance-e2e"] += 1
    time.sleep(1.2)  # a heartbeat lands: the reservation covers the traffic

    today = time.strftime("%Y-%m-%d", time.gmtime())
    report = _report(traced, today, "tenant,model", "json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    rows = {r["tenant"]: r for r in data["rows"]}
    assert rows["finance-e2e"]["requests"] == before["finance-e2e"] == 10
    assert rows["demo"]["requests"] >= before["demo"]
    assert data["currency"] == "EUR"
    totals = data["totals"]
    assert totals["used_ns"] + totals["idle_ns"] == totals["reserved_ns"] > totals["used_ns"] > 0
    assert sum(r["used_ns"] for r in data["rows"]) == totals["used_ns"]
    # Priced at 3.6/h = 1e-6 per device-ms.
    used_s = rows["finance-e2e"]["used_ns"] / 1e9
    assert float(rows["finance-e2e"]["cost"]) == pytest.approx(used_s * 1e-3, abs=1e-9)

    # The ledger file itself agrees, and so does Prometheus (same split, as floats).
    db = sqlite3.connect(traced.state_dir / "gpugate.db")
    try:
        ledger_ns = db.execute(
            "SELECT SUM(charge_ns) FROM ledger_allocations WHERE tenant = 'finance-e2e'"
        ).fetchone()[0]
    finally:
        db.close()
    assert ledger_ns == rows["finance-e2e"]["used_ns"]
    prom = traced.metric("gpugate_tenant_device_seconds_total", tenant="finance-e2e")
    assert prom == pytest.approx(ledger_ns / 1e9, rel=1e-9)
    assert traced.metric("gpugate_tenant_cost_total", tenant="finance-e2e", currency="EUR") > 0

    csv_out = _report(traced, today, "tenant,day", "csv")
    assert csv_out.returncode == 0, csv_out.stderr
    parsed = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    assert parsed[-1]["tenant"] == "TOTAL"
    assert sum(int(r["used_ns"]) for r in parsed[:-1]) == int(parsed[-1]["used_ns"])


def test_kill_9_under_load_loses_no_answered_request(tmp_path: Path) -> None:
    # Traces go to a collector that is not there: that must cost no request either.
    dead = free_port()
    gw = start_gateway(
        tmp_path / "k9",
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        },
    )
    created = gw.cli("tenants", "create", "second", "--json")
    keys = {"demo": gw.demo_key, "second": json.loads(created.stdout)["api_key"]}
    answered = Counter[str]()
    failed_before_kill: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()

    def client(tenant: str) -> None:
        c = tgrpc.InferenceServerClient(gw.grpc_url)
        inp = tgrpc.InferInput("pixels", [2, 64], "FP32")
        inp.set_data_from_numpy(X[:2])
        while not stop.is_set():
            try:
                c.infer("digits", [inp], headers={"authorization": f"Bearer {keys[tenant]}"})
            except InferenceServerException as exc:
                if not killed.is_set():
                    failed_before_kill.append(str(exc))
                continue  # refused or cut off by the kill: not answered, not counted
            with lock:
                answered[tenant] += 1

    threads = [threading.Thread(target=client, args=(t,)) for t in ("demo", "second") * 4]
    try:
        for t in threads:
            t.start()
        time.sleep(4)
        with lock:
            assert sum(answered.values()) > 50  # the load was real when the kill came
        killed.set()
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait()
    db = sqlite3.connect(tmp_path / "k9" / "gpugate.db")
    try:
        recorded = dict(
            db.execute(
                "SELECT tenant, SUM(requests) FROM ledger_allocations GROUP BY tenant"
            ).fetchall()
        )
    finally:
        db.close()
    assert failed_before_kill == []
    for tenant, n in answered.items():
        # Every answer left after its batch was committed: none can be missing.
        assert recorded.get(tenant, 0) >= n, (tenant, recorded, answered)


def _get(gw: Gateway, path: str, token: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(
        f"http://{gw.http_url}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _user(gw: Gateway, name: str, role: str) -> str:
    made = gw.cli("users", "create", name, "--role", role, "--json")
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["token"])


def test_finance_reads_costs_and_changes_nothing_a_tenant_reads_its_own(traced: Gateway) -> None:
    _grpc(traced, traced.demo_key, 2)
    finance = _user(traced, "fin-e2e", "finance")
    deployer = _user(traced, "dep-e2e", "deployer")
    today = time.strftime("%Y-%m-%d", time.gmtime())

    code, body = _get(traced, f"/admin/costs?from={today}&to={today}&group_by=tenant", finance)
    assert code == 200, body
    rows = {r["tenant"]: r for r in body["rows"]}  # type: ignore[union-attr]
    assert rows["demo"]["requests"] >= 1 and body["currency"] == "EUR"
    totals = body["totals"]
    assert totals["used_ns"] + totals["idle_ns"] == totals["reserved_ns"]  # type: ignore[index]
    cli = traced.cli(
        "costs", "report", "--from", today, "--to", today, "--format", "json", "--token", finance,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["rows"][0]["tenant"] in rows

    # Finance cannot change anything; other roles cannot read costs.
    assert _get(traced, "/admin/costs", deployer)[0] == 403
    assert _get(traced, "/admin/costs", "not-a-token")[0] == 401
    denied = traced.cli("users", "create", "x-e2e", "--role", "admin", "--token", finance)
    assert denied.returncode == 1 and "may not" in denied.stderr
    refused = traced.cli("costs", "report", "--from", today, "--to", today, "--token", deployer)
    assert refused.returncode == 1 and "may not" in refused.stderr
    req = urllib.request.Request(
        f"http://{traced.http_url}/admin/tenants",
        data=b'{"name": "from-finance"}',
        headers={"Authorization": f"Bearer {finance}", "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 403

    # A tenant reads its own usage with its API key, and nobody else's.
    code, own = _get(traced, f"/usage?from={today}&to={today}", traced.demo_key)
    assert code == 200, own
    assert {r["model"] for r in own["rows"]} == {"digits"}  # type: ignore[union-attr]
    assert own["totals"]["used_ns"] == rows["demo"]["used_ns"]  # type: ignore[index]
    assert own["totals"]["reserved_ns"] == 0  # type: ignore[index]
    assert _get(traced, "/usage?tenant=finance-e2e", traced.demo_key)[0] == 400
    assert _get(traced, "/usage", finance)[0] == 401  # a user token is not a tenant key
