"""Inference over HTTP (JSON, binary, compressed) and gRPC (raw and typed contents),
failures inside the service, and concurrent requests batched and routed exactly."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.integration.router.helpers import (
    GOOD_JSON,
    HTTP_ALICE,
    K1,
    MD_ALICE,
    X1,
    AffineBackend,
    Stack,
    TritonHttp,
    affine,
    assert_affine,
    decode_outputs,
    grpc_infer,
    http_infer,
    http_inputs,
    infer_body,
    jk,
    jx,
    sample,
    typed_request,
)

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------
# inference: HTTP JSON, HTTP binary, gRPC raw, gRPC typed contents
# --------------------------------------------------------------------------


def test_infer_http_json(hc: httpclient.InferenceServerClient) -> None:
    x, k = sample(3, seed=1)
    outputs = [
        httpclient.InferRequestedOutput("y", binary_data=False),
        httpclient.InferRequestedOutput("s", binary_data=False),
    ]
    result = hc.infer(
        "affine",
        http_inputs(x, k, binary=False),
        outputs=outputs,
        request_id="json-1",
        headers=dict(HTTP_ALICE),
    )
    assert_affine(result, x, k)
    response = result.get_response()
    assert response["model_name"] == "affine"
    assert response["model_version"] == "2"  # no version: the newest
    assert response["id"] == "json-1"
    for out in response["outputs"]:
        assert "data" in out and "binary_data_size" not in out.get("parameters", {})
    assert [o["shape"] for o in response["outputs"]] == [[3, 4], [3, 1]]


def test_infer_http_json_raw(web: httpx.Client) -> None:
    """A hand-written JSON request: the response is pure JSON (no binary part)."""
    r = web.post("/v2/models/affine/versions/1/infer", json=GOOD_JSON | {"id": "raw"})
    assert r.status_code == 401  # no key
    r = web.post(
        "/v2/models/affine/versions/1/infer", json=GOOD_JSON | {"id": "raw"}, headers=HTTP_ALICE
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in r.headers
    body = r.json()
    assert body["id"] == "raw" and body["model_version"] == "1"
    assert body["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [6.0, 7.0, 8.0, 9.0]},
        {"name": "s", "datatype": "FP32", "shape": [1, 1], "data": [10.0]},
    ]
    # Integers are fine for an FP32 input.
    ints = infer_body([jx(data=[1, 2, 3, 4]), jk()])
    r = web.post("/v2/models/affine/infer", json=ints, headers=HTTP_ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [7.0, 9.0, 11.0, 13.0]
    # Nested row-major "data" is accepted as well as flat.
    nested = infer_body([jx(data=[[1.0, 2.0, 3.0, 4.0]]), jk(data=[[5]])])
    r = web.post("/v2/models/affine/infer", json=nested, headers=HTTP_ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [7.0, 9.0, 11.0, 13.0]


def test_infer_http_binary(hc: httpclient.InferenceServerClient) -> None:
    x, k = sample(5, seed=2)
    result = http_infer(hc, x, k, request_id="bin-1")
    assert_affine(result, x, k)
    response = result.get_response()
    assert response["id"] == "bin-1"
    assert response["model_version"] == "2"
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in response["outputs"]}
    assert sizes == {"y": 5 * 4 * 4, "s": 5 * 4}

    # Version routing: /versions/1 runs version 1 (m = 1).
    result = http_infer(hc, x, k, model_version="1")
    assert result.get_response()["model_version"] == "1"
    assert_affine(result, x, k, mult=1)
    result = http_infer(hc, x, k, model_version="2")
    assert result.get_response()["model_version"] == "2"
    assert_affine(result, x, k, mult=2)

    # A requested subset of outputs returns only those.
    result = http_infer(hc, x, k, outputs=[httpclient.InferRequestedOutput("s")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["s"]
    assert result.as_numpy("y") is None
    np.testing.assert_array_equal(result.as_numpy("s"), affine(x, k, 2)["s"])

    # Mixed: one output binary, one JSON.
    outputs = [
        httpclient.InferRequestedOutput("y", binary_data=True),
        httpclient.InferRequestedOutput("s", binary_data=False),
    ]
    result = http_infer(hc, x, k, outputs=outputs)
    assert_affine(result, x, k)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "binary_data_size" in by_name["y"]["parameters"]
    assert "data" in by_name["s"]


def test_infer_priority_and_timeout_parameters(
    hc: httpclient.InferenceServerClient, gc: grpcclient.InferenceServerClient
) -> None:
    """Valid priority / timeout values, including the largest, are honoured, not refused."""
    x, k = sample(2, seed=6)
    cases: list[dict[str, Any]] = [
        {"priority": 1},
        {"priority": 3},  # the least urgent level
        {"timeout": 5_000_000},
        {"timeout": 2**63 - 1},
        {"priority": 3, "timeout": 1_000_000},
    ]
    for kwargs in cases:
        assert_affine(http_infer(hc, x, k, **kwargs), x, k)
        assert_affine(grpc_infer(gc, x, k, **kwargs), x, k)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_infer_http_compressed_request(
    hc: httpclient.InferenceServerClient, algorithm: str
) -> None:
    x, k = sample(4, seed=3)
    result = http_infer(hc, x, k, request_compression_algorithm=algorithm)
    assert_affine(result, x, k)


def test_infer_grpc_raw(gc: grpcclient.InferenceServerClient) -> None:
    x, k = sample(6, seed=4)
    result = grpc_infer(gc, x, k, request_id="grpc-1")
    assert_affine(result, x, k)
    response = result.get_response()
    assert response.id == "grpc-1"
    assert response.model_name == "affine"
    assert response.model_version == "2"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "FP32", [6, 4]),
        ("s", "FP32", [6, 1]),
    ]

    result = grpc_infer(gc, x, k, model_version="1")
    assert result.get_response().model_version == "1"
    assert_affine(result, x, k, mult=1)

    result = grpc_infer(gc, x, k, outputs=[grpcclient.InferRequestedOutput("y")])
    assert [o.name for o in result.get_response().outputs] == ["y"]
    assert result.as_numpy("s") is None
    np.testing.assert_array_equal(result.as_numpy("y"), affine(x, k, 2)["y"])


def test_infer_grpc_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x, k = sample(3, seed=5)
    for version, mult in [("", 2), ("1", 1), ("2", 2)]:
        request = typed_request(x, k, model_version=version, id=f"typed-{version}")
        response = stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
        assert response.id == f"typed-{version}"
        assert response.model_version == (version or "2")
        out = decode_outputs(response)
        want = affine(x, k, mult)
        np.testing.assert_array_equal(out["y"], want["y"])
        np.testing.assert_array_equal(out["s"], want["s"])

    request = typed_request(x, k)
    request.outputs.add(name="s")
    response = stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
    assert list(decode_outputs(response)) == ["s"]


def test_model_failure_is_internal(web: httpx.Client, gc: grpcclient.InferenceServerClient) -> None:
    r = web.post("/v2/models/broken/infer", json=GOOD_JSON, headers=HTTP_ALICE)
    assert r.status_code == 500
    assert "model broken version 1 failed: replica exploded" in r.json()["error"]
    with pytest.raises(InferenceServerException) as err:
        grpc_infer(gc, X1, K1, model="broken")
    assert err.value.status() == "StatusCode.INTERNAL"
    assert "replica exploded" in err.value.message()


def test_unexpected_error_is_internal_not_a_crash(
    web: httpx.Client, gc: grpcclient.InferenceServerClient
) -> None:
    """A non-gateway exception inside the service leaves as a JSON 500 / INTERNAL."""
    x, k = sample(6, seed=8)
    body = infer_body([jx([6, 4], x.ravel().tolist()), jk([6, 1], k.ravel().tolist())])
    r = web.post("/v2/models/misfit/infer", json=body, headers=HTTP_ALICE)
    assert r.status_code == 500
    assert r.json() == {"error": "internal error: ValueError"}
    with pytest.raises(InferenceServerException) as err:
        grpc_infer(gc, x, k, model="misfit")
    assert err.value.status() == "StatusCode.INTERNAL"
    assert err.value.message() == "internal error: ValueError"
    # Within the batcher's own limit it works.
    assert_affine(grpc_infer(gc, x[:4], k[:4], model="misfit"), x[:4], k[:4])


# --------------------------------------------------------------------------
# concurrency: batching with exact row routing, over both protocols
# --------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_routed_exactly(stack: Stack) -> None:
    backend: AffineBackend = stack.backends[("affine", "2")]
    calls_before = backend.calls
    rows_log_start = len(backend.batch_rows)
    threads, per_thread = 12, 5
    barrier = threading.Barrier(threads)
    samples = {i: sample(i % 8 + 1, seed=1000 + i) for i in range(threads * per_thread)}

    def worker(t: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        use_grpc = t % 2 == 1
        client: Any = (
            grpcclient.InferenceServerClient(stack.grpc_url)
            if use_grpc
            else TritonHttp(stack.http_url, network_timeout=30.0)
        )
        got = {}
        try:
            barrier.wait(10)
            for j in range(per_thread):
                i = t * per_thread + j
                x, k = samples[i]
                if use_grpc:
                    result = grpc_infer(client, x, k, request_id=f"c{i}")
                    assert result.get_response().id == f"c{i}"
                else:
                    result = http_infer(client, x, k, request_id=f"c{i}")
                    assert result.get_response()["id"] == f"c{i}"
                got[i] = (result.as_numpy("y"), result.as_numpy("s"))
        finally:
            client.close()
        return got

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for part in pool.map(worker, range(threads)):
            results.update(part)

    assert sorted(results) == list(range(threads * per_thread))
    for i, (y, s) in results.items():
        x, k = samples[i]
        want = affine(x, k, 2)
        assert y.shape == (len(x), 4) and s.shape == (len(x), 1)
        np.testing.assert_array_equal(y, want["y"], err_msg=f"request {i}")
        np.testing.assert_array_equal(s, want["s"], err_msg=f"request {i}")

    calls = backend.calls - calls_before
    batch_rows = backend.batch_rows[rows_log_start:]
    total_rows = sum(len(samples[i][0]) for i in samples)
    assert sum(batch_rows) == total_rows  # every row ran exactly once
    assert calls <= len(samples) // 3, f"{calls} backend calls for {len(samples)} requests"
    assert max(batch_rows) > 8  # some batch merged several requests

    # The same inputs sent alone give identical outputs.
    with TritonHttp(stack.http_url) as alone:
        for i in (0, 7, 13, 29, 42, 59):
            x, k = samples[i]
            result = http_infer(alone, x, k)
            np.testing.assert_array_equal(result.as_numpy("y"), results[i][0])
            np.testing.assert_array_equal(result.as_numpy("s"), results[i][1])
