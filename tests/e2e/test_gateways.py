"""Two gateway replicas behind one `gpugate serve` (server.gateway_replicas: 2): they
share the HTTP and gRPC ports, each serves its own metrics port, the ledger has a row
for every answer whichever gateway gave it, and the rollout analysis judges the
traffic of both gateways."""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.request
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import grpc
import pytest
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

from tests.e2e.conftest import Gateway, admin, admin_token, configured_gateway, wait_for
from tests.e2e.test_rollout import Same, production_model, register_candidate

pytestmark = pytest.mark.timeout(600)

CONFIG = """
server:
  gateway_replicas: 2
policies:
  digits:
    required_approvals: 1
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with configured_gateway(tmp_path_factory, "two-gateways", CONFIG) as gw:
        yield gw


def scrape(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def answered(gw: Gateway, **labels: str) -> list[float]:
    """Requests answered 200 by each gateway, from each one's metrics port."""
    return [
        scrape(gw.metrics_port + rank, "gpugate_requests_total", code="200", **labels)
        for rank in (0, 1)
    ]


def infer_on_new_connection(gw: Gateway, rng: random.Random) -> str:
    """One digits request on a connection of its own (the kernel picks the gateway)."""
    pixels = [float(rng.randint(0, 16)) for _ in range(64)]
    body = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels}]}
    )
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v2/models/digits/infer",
            body,
            {"Authorization": f"Bearer {gw.demo_key}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, data[:300]
    return str(json.loads(data)["model_version"])


def test_both_gateways_serve_the_shared_ports_and_the_ledger_has_every_answer(
    gateway: Gateway,
) -> None:
    rng = random.Random(1)
    before = answered(gateway)
    for _ in range(120):
        infer_on_new_connection(gateway, rng)
    for _ in range(40):  # gRPC: a channel each, so a connection each
        with grpc.insecure_channel(gateway.grpc_url) as channel:
            request = pb.ModelInferRequest(model_name="digits")
            request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
            request.inputs[0].contents.fp32_contents.extend([1.0] * 64)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            md = (("authorization", f"Bearer {gateway.demo_key}"),)
            assert stub.ModelInfer(request, metadata=md, timeout=60).model_version == "1"
    after = answered(gateway)
    per_gateway = [a - b for a, b in zip(after, before, strict=True)]
    print(f"two gateways: requests answered per gateway {per_gateway}")
    assert sum(per_gateway) == 160
    assert min(per_gateway) >= 20, per_gateway  # the kernel spread the connections

    today = date.today().isoformat()

    def ledger_requests() -> int | None:
        req = urllib.request.Request(
            f"http://{gateway.http_url}/usage?from={today}&to={today}",
            headers={"Authorization": f"Bearer {gateway.demo_key}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            n = int(json.loads(resp.read())["totals"]["requests"])
        return n if n == int(sum(after)) else None

    # Each gateway writes its own batches' rows; together they have every answer.
    wait_for("the ledger to hold every answer", ledger_requests, 30)


def test_the_rollout_analysis_judges_the_traffic_of_both_gateways(
    gateway: Gateway, tmp_path: Path
) -> None:
    """min_requests is set so that neither gateway's share alone could pass the first
    analysis: the candidate is promoted only if the leader counted both."""
    register_candidate(gateway, tmp_path, Same(production_model(gateway)), "2")
    token = admin_token(gateway)
    status, started = admin(
        gateway,
        "POST",
        "/models/digits/rollout",
        token,
        {
            "version": "2",
            "steps": [50, 100],
            "interval_s": 12,  # the traffic below ends well before the first analysis
            "min_requests": 30,
            "max_p99_ratio": 100,
        },
    )
    assert status < 300, started
    wait_for(
        "the candidate to serve",
        lambda: any(e["version"] == "2" and e["state"] == "READY" for e in gateway.index()),
        180,
    )
    rng = random.Random(2)
    began = time.monotonic()
    before = [answered(gateway, version=v) for v in ("1", "2")]
    versions = [infer_on_new_connection(gateway, rng) for _ in range(100)]
    after = [answered(gateway, version=v) for v in ("1", "2")]
    sent = {
        v: [a - b for a, b in zip(after[i], before[i], strict=True)]
        for i, v in enumerate(("1", "2"))
    }
    print(f"rollout across two gateways: per version, per gateway {sent}")
    assert time.monotonic() - began < 8, "the traffic must end before the first analysis"
    assert versions.count("2") == sum(sent["2"])
    # Neither gateway alone served min_requests of both versions.
    assert any(min(sent["1"][g], sent["2"][g]) < 30 for g in (0, 1)), sent

    def decided() -> dict[str, object] | None:
        code, rollout = admin(gateway, "GET", "/models/digits/rollout", token)
        assert code == 200, rollout
        return rollout if rollout["state"] == "succeeded" else None

    rollout = wait_for("the promotion", decided, 60)
    assert rollout is not None
    figures = rollout["last_analysis"]
    # The window held every request of both gateways since the candidate began serving.
    assert figures["candidate"]["requests"] == sum(sent["2"]), figures
    assert figures["production"]["requests"] == sum(sent["1"]), figures
