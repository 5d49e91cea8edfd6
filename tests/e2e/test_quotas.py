"""Rate quotas against a real ``gpugate serve`` (SQLite and PostgreSQL), set through the
CLI: a tenant at 50 requests/s offered 200/s gets 50/s within 10% over 10 s, the rest
429 with Retry-After (counted by tenant and reason); a tenant under its quota is
untouched; gRPC answers RESOURCE_EXHAUSTED with the delay in trailing metadata; rows over
a rows burst are 413; the quota survives a restart and can be cleared."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

from tests.e2e.conftest import DATABASES, Gateway, gateway_on

pytestmark = pytest.mark.timeout(600)

RATE, BURST, OFFERED, SECONDS = 50.0, 5.0, 200.0, 10.0


def _body(rows: int = 1) -> str:
    data = [0.5] * (64 * rows)
    return json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [rows, 64], "data": data}]}
    )


@pytest.fixture(scope="module", params=DATABASES)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with gateway_on(request, tmp_path_factory.mktemp("quotas") / "state") as gw:
        yield gw


def _tenant(gw: Gateway, name: str) -> str:
    made = gw.cli("tenants", "create", name, "--json")
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["api_key"])


def _paced(gw: Gateway, key: str, per_s: float, seconds: float, threads: int = 8) -> Counter[str]:
    """``per_s`` requests a second, evenly spaced, from ``threads`` keep-alive
    connections, for ``seconds``: the answers' statuses (and "no retry-after" for a 429
    without it). A request that finds its slot passed goes at once."""
    answers: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.monotonic() + 0.2
    total = int(per_s * seconds)

    def run(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
        try:
            for i in range(first, total, threads):
                delay = start + i / per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                conn.request(
                    "POST",
                    "/v2/models/digits/infer",
                    _body(),
                    {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                resp.read()
                status = str(resp.status)
                if status == "429" and not resp.getheader("Retry-After"):
                    status = "429 without Retry-After"
                with lock:
                    answers[status] += 1
        finally:
            conn.close()

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    answers["elapsed_ms"] = round((time.monotonic() - start) * 1000)
    return answers


def test_a_tenant_over_its_rate_gets_its_rate_and_the_rest_429(gateway: Gateway) -> None:
    limited, free = _tenant(gateway, "quota-limited"), _tenant(gateway, "quota-free")
    set_quota = gateway.cli(
        "tenants", "quota", "quota-limited", "--requests-per-s", "50", "--requests-burst", "5"
    )
    assert set_quota.returncode == 0, set_quota.stderr
    shown = gateway.cli("tenants", "quotas", "quota-limited", "--json")
    assert json.loads(shown.stdout) == [
        {"model": None, "requests": {"per_s": RATE, "burst": BURST}, "rows": None}
    ]
    time.sleep(2.5)  # the key cache's TTL: the quota is read with the tenant
    results: dict[str, Counter[str]] = {}
    beside = threading.Thread(
        target=lambda: results.__setitem__("free", _paced(gateway, free, 20, SECONDS, 2))
    )
    beside.start()
    got = _paced(gateway, limited, OFFERED, SECONDS)
    beside.join()
    elapsed_s = got.pop("elapsed_ms") / 1000
    print(f"limited tenant: {dict(got)} in {elapsed_s:.2f} s; free tenant: {results['free']}")
    assert set(got) <= {"200", "429"}, got  # every 429 said when to retry
    offered = got["200"] + got["429"]
    assert offered / elapsed_s >= 0.75 * OFFERED  # the client kept up: the quota limited
    granted_per_s = got["200"] / elapsed_s
    assert granted_per_s == pytest.approx(RATE, rel=0.10)
    assert (
        gateway.metric(
            "gpugate_admission_refusals_total", tenant="quota-limited", reason="requests_per_s"
        )
        == got["429"]
    )
    free_got = results["free"]
    free_got.pop("elapsed_ms")
    assert free_got == Counter({"200": int(20 * SECONDS)})  # untouched


def test_grpc_says_how_long_to_wait_and_rows_over_the_burst_are_too_large(
    gateway: Gateway,
) -> None:
    key = _tenant(gateway, "quota-grpc")
    assert gateway.cli("tenants", "quota", "quota-grpc", "--requests-per-s", "1").returncode == 0
    assert (
        gateway.cli(
            "tenants", "quota", "quota-grpc", "--model", "digits", "--rows-per-s", "4",
            "--rows-burst", "8",
        ).returncode
        == 0
    )  # fmt: skip
    time.sleep(2.5)
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP32", shape=[9, 64])
    request.raw_input_contents.append(np.full((9, 64), 0.5, np.float32).tobytes())
    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # 9 rows against a rows burst of 8 for digits: never admissible.
        with pytest.raises(grpc.RpcError) as too_large:
            stub.ModelInfer(request, metadata=metadata, timeout=30)
        assert too_large.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "burst of 8 rows (model 'digits')" in (too_large.value.details() or "")
        # That request took the one request token of the second: the next one waits.
        del request.inputs[:]
        del request.raw_input_contents[:]
        request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(np.full((1, 64), 0.5, np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as waited:
            stub.ModelInfer(request, metadata=metadata, timeout=30)
        assert waited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(waited.value.trailing_metadata() or ())
        assert trailers["retry-after"] == "1"
        assert 0 < int(trailers["grpc-retry-pushback-ms"]) <= 1000
        time.sleep(float(trailers["grpc-retry-pushback-ms"]) / 1000)
        answer = stub.ModelInfer(request, metadata=metadata, timeout=30)
        assert answer.outputs[0].name


def test_a_quota_survives_a_restart_and_can_be_cleared(gateway: Gateway) -> None:
    key = _tenant(gateway, "quota-restart")
    assert gateway.cli("tenants", "quota", "quota-restart", "--requests-per-s", "2").returncode == 0
    gateway.restart()
    got = _paced(gateway, key, 40, 2, 2)
    assert got["429"] >= 30 and got["200"] <= 8, got
    cleared = gateway.cli("tenants", "quota", "quota-restart", "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(gateway.cli("tenants", "quotas", "quota-restart", "--json").stdout) == []
    time.sleep(2.5)
    got = _paced(gateway, key, 40, 2, 2)
    assert got["200"] == 80, got


def test_a_quota_is_set_with_the_tenant_in_one_call(gateway: Gateway) -> None:
    made = gateway.cli(
        "tenants", "create", "quota-onboard", "--weight", "2", "--requests-per-s", "5",
        "--rows-per-s", "40", "--rows-burst", "80", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    listed = json.loads(gateway.cli("tenants", "quotas", "quota-onboard", "--json").stdout)
    assert listed == [
        {
            "model": None,
            "requests": {"per_s": 5.0, "burst": None},
            "rows": {"per_s": 40.0, "burst": 80.0},
        }
    ]
    # A change replaces the quota over every model and leaves the weight as it is.
    changed = gateway.cli("tenants", "update", "quota-onboard", "--requests-per-s", "7", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["weight"] == 2.0
    listed = json.loads(gateway.cli("tenants", "quotas", "quota-onboard", "--json").stdout)
    assert listed == [{"model": None, "requests": {"per_s": 7.0, "burst": None}, "rows": None}]
    # Checked before anything is written: a rate out of range creates no tenant.
    refused = gateway.cli("tenants", "create", "quota-refused", "--requests-per-s", "1e12")
    assert refused.returncode == 1 and "requests" in refused.stderr, refused.stderr
    names = [t["tenant"] for t in json.loads(gateway.cli("tenants", "list", "--json").stdout)]
    assert "quota-onboard" in names and "quota-refused" not in names
