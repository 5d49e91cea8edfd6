"""Health, readiness, metadata, model configuration, statistics and the repository
index, over HTTP and gRPC."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from tests.integration.router.helpers import (
    AFFINE_MAX_BATCH,
    EXTENSIONS,
    Stack,
    assert_affine,
    grpc_infer,
    http_infer,
    sample,
)

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------
# health, metadata, readiness, repository index
# --------------------------------------------------------------------------

AFFINE_INPUTS_META = [
    {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "k", "datatype": "INT64", "shape": [-1, 1]},
]
AFFINE_OUTPUTS_META = [
    {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "s", "datatype": "FP32", "shape": [-1, 1]},
]
INDEX = [
    ("affine", "1"),
    ("affine", "2"),
    ("broken", "1"),
    ("misfit", "1"),
    ("slow", "1"),
    ("vec", "1"),
]


def test_health_and_metadata_http(hc: httpclient.InferenceServerClient) -> None:
    assert hc.is_server_live() is True
    assert hc.is_server_ready() is True
    assert hc.get_server_metadata() == {
        "name": "gpugate",
        "version": "0.1.0",
        "extensions": EXTENSIONS,
    }
    for version in ("", "1", "2"):
        meta = hc.get_model_metadata("affine", version)
        assert meta == {
            "name": "affine",
            "versions": ["1", "2"],
            "platform": "pytorch_libtorch",
            "inputs": AFFINE_INPUTS_META,
            "outputs": AFFINE_OUTPUTS_META,
        }
    vec = hc.get_model_metadata("vec")
    assert vec["inputs"] == [{"name": "v", "datatype": "FP32", "shape": [-1, -1]}]
    assert vec["versions"] == ["1"]
    for name, version, needle in [
        ("nope", "", "unknown model 'nope'"),
        ("affine", "9", "model 'affine' has no version '9'"),
    ]:
        with pytest.raises(InferenceServerException) as err:
            hc.get_model_metadata(name, version)
        assert err.value.status() == "404"
        assert needle in err.value.message()

    assert hc.is_model_ready("affine") is True
    assert hc.is_model_ready("affine", "1") is True
    assert hc.is_model_ready("affine", "2") is True
    assert hc.is_model_ready("affine", "3") is False
    assert hc.is_model_ready("nope") is False

    index = hc.get_model_repository_index()
    assert [(e["name"], e["version"]) for e in index] == INDEX
    assert {e["state"] for e in index} == {"READY"}


def test_health_and_metadata_raw_http(web: httpx.Client) -> None:
    assert web.get("/v2/health/live").status_code == 200
    assert web.get("/v2/health/ready").status_code == 200
    assert web.get("/v2/models/affine/ready").status_code == 200
    assert web.get("/v2/models/affine/versions/1/ready").status_code == 200
    assert web.get("/v2/models/nope/ready").status_code == 503
    r = web.post("/v2/repository/index", json={})
    assert r.status_code == 200
    assert [(e["name"], e["version"]) for e in r.json()] == INDEX
    r = web.post("/v2/repository/index", content=b"{nope")
    assert r.status_code == 400 and "error" in r.json()
    r = web.post("/v2/repository/index", content=b"[1]")
    assert r.status_code == 400 and "error" in r.json()
    r = web.get("/v2/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    r = web.get("/v2/models/affine/infer")
    assert r.status_code == 405 and "error" in r.json()


AFFINE_CONFIG = {
    "name": "affine",
    "platform": "pytorch_libtorch",
    "backend": "pytorch",
    "max_batch_size": AFFINE_MAX_BATCH,
    "input": [
        {"name": "x", "data_type": "TYPE_FP32", "dims": [4]},
        {"name": "k", "data_type": "TYPE_INT64", "dims": [1]},
    ],
    "output": [
        {"name": "y", "data_type": "TYPE_FP32", "dims": [4]},
        {"name": "s", "data_type": "TYPE_FP32", "dims": [1]},
    ],
    "dynamic_batching": {
        "max_queue_delay_microseconds": 20_000,
        "priority_levels": 3,
        "default_priority_level": 2,
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": 10_000_000,
            "allow_timeout_override": True,
            "max_queue_size": 4096,
        },
    },
    "instance_group": [{"name": "affine", "kind": "KIND_CPU", "count": 1}],
}


def _as_dict(message: Any) -> dict[str, Any]:
    """A tritonclient protobuf as JSON-shaped data, 64-bit integers as numbers."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)

    def numbers(v: Any, key: str = "") -> Any:
        if isinstance(v, dict):
            return {k: numbers(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [numbers(x, key) for x in v]
        if key not in ("name", "version") and isinstance(v, str) and v.lstrip("-").isdigit():
            return int(v)
        return v

    return dict(numbers(data))


def test_model_config(
    hc: httpclient.InferenceServerClient, gc: grpcclient.InferenceServerClient
) -> None:
    for version in ("", "1", "2"):
        assert hc.get_model_config("affine", version) == AFFINE_CONFIG
        grpc_config = _as_dict(gc.get_model_config("affine", version).config)
        # proto3 JSON leaves out fields at their zero value (KIND_AUTO, REJECT, 0, false).
        want = json.loads(json.dumps(AFFINE_CONFIG))
        del want["dynamic_batching"]["default_queue_policy"]["timeout_action"]  # REJECT = 0
        assert grpc_config == want
    vec = hc.get_model_config("vec")
    assert vec["input"] == [{"name": "v", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert vec["max_batch_size"] == 8
    assert list(gc.get_model_config("vec").config.input[0].dims) == [-1]
    for name, version, needle in [
        ("nope", "", "unknown model 'nope'"),
        ("affine", "9", "model 'affine' has no version '9'"),
    ]:
        with pytest.raises(InferenceServerException) as err:
            hc.get_model_config(name, version)
        assert (err.value.status(), needle in err.value.message()) == ("404", True)
        with pytest.raises(InferenceServerException) as err:
            gc.get_model_config(name, version)
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert needle in err.value.message()


def _stats_of(
    hc: httpclient.InferenceServerClient, model: str, version: str = "1"
) -> dict[str, Any]:
    found = hc.get_inference_statistics(model, version)["model_stats"]
    assert [(s["name"], s["version"]) for s in found] == [(model, version)]
    return dict(found[0])


def _stats(hc: httpclient.InferenceServerClient, version: str) -> dict[str, Any]:
    return _stats_of(hc, "affine", version)


def _without_zeros(value: Any) -> Any:
    """What proto3 JSON keeps of a value: no zero numbers, empty objects or lists."""
    if isinstance(value, dict):
        kept = {k: _without_zeros(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in (0, {}, [])}
    if isinstance(value, list):
        return [_without_zeros(v) for v in value]
    return value


def test_model_statistics(
    stack: Stack,
    hc: httpclient.InferenceServerClient,
    gc: grpcclient.InferenceServerClient,
) -> None:
    before = _stats(hc, "1")
    sent = [(1, 71), (3, 72), (2, 73)]  # (rows, seed)
    for i, (rows, seed) in enumerate(sent):
        x, k = sample(rows, seed)
        send = http_infer if i % 2 else grpc_infer
        assert_affine(send(hc if i % 2 else gc, x, k, model_version="1"), x, k, mult=1)
    x, k = sample(1, 74)
    with pytest.raises(InferenceServerException):
        http_infer(hc, x[:, :3], k, model_version="1")  # wrong shape: a failed request
    after = _stats(hc, "1")

    def delta(*path: str) -> int:
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        return int(a) - int(b)

    rows = sum(r for r, _ in sent)
    assert delta("inference_count") == rows
    executions = delta("execution_count")
    assert 1 <= executions <= len(sent)
    assert delta("inference_stats", "success", "count") == len(sent)
    assert delta("inference_stats", "fail", "count") == 1
    assert delta("inference_stats", "success", "ns") > 0
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", part, "count") == len(sent), part
    # AffineBackend reports 1,000 ns of device time per batch; each request gets its batch's.
    assert delta("inference_stats", "compute_infer", "ns") == 1000 * len(sent)
    # The backend sleeps 5 ms per batch: the rest of the round trip is "compute input".
    assert delta("inference_stats", "compute_input", "ns") >= 0.004e9 * len(sent)
    assert after["last_inference"] >= before["last_inference"]
    assert abs(after["last_inference"] / 1000 - time.time()) < 60
    # batch_stats: one entry per batch size, counts adding up to the executions and rows.
    sizes = {b["batch_size"]: b for b in after["batch_stats"]}
    assert sum(b["compute_infer"]["count"] for b in sizes.values()) == after["execution_count"]
    assert (
        sum(n * b["compute_infer"]["count"] for n, b in sizes.items()) == after["inference_count"]
    )
    # gRPC says the same, and without a name lists every version serving (proto3 JSON
    # leaves zeros out, so both sides are compared without them: idle versions too).
    grpc_stats = _as_dict(gc.get_inference_statistics("affine", "1"))["model_stats"]
    assert grpc_stats == [_stats(hc, "1")]
    everything = hc.get_inference_statistics()["model_stats"]
    assert [(s["name"], s["version"]) for s in everything] == INDEX
    grpc_everything = _as_dict(gc.get_inference_statistics())["model_stats"]
    assert [_without_zeros(s) for s in everything] == [_without_zeros(s) for s in grpc_everything]
    # A batch that failed runs nothing and counts its request as failed.
    broken = _stats_of(hc, "broken")
    with pytest.raises(InferenceServerException) as err:
        http_infer(hc, *sample(2, 75), model="broken")
    assert err.value.status() == "500"
    broken_after = _stats_of(hc, "broken")
    assert broken_after["inference_stats"]["fail"]["count"] == (
        broken["inference_stats"]["fail"]["count"] + 1
    )
    assert (broken_after["execution_count"], broken_after["inference_count"]) == (
        broken["execution_count"],
        broken["inference_count"],
    )
    with pytest.raises(InferenceServerException) as err:  # a version needs its model
        gc.get_inference_statistics("", "1")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    versions = _as_dict(gc.get_inference_statistics("affine"))["model_stats"]
    assert [s["version"] for s in versions] == ["1", "2"]
    with pytest.raises(InferenceServerException) as err:
        gc.get_inference_statistics("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        hc.get_inference_statistics("affine", "9")
    assert err.value.status() == "404"


def test_health_and_metadata_grpc(gc: grpcclient.InferenceServerClient) -> None:
    assert gc.is_server_live() is True
    assert gc.is_server_ready() is True
    server = gc.get_server_metadata()
    assert server.name == "gpugate"
    assert server.version == "0.1.0"
    assert list(server.extensions) == EXTENSIONS
    for version in ("", "1", "2"):
        meta = gc.get_model_metadata("affine", version)
        assert meta.name == "affine"
        assert list(meta.versions) == ["1", "2"]
        assert meta.platform == "pytorch_libtorch"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 4]),
            ("k", "INT64", [-1, 1]),
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("y", "FP32", [-1, 4]),
            ("s", "FP32", [-1, 1]),
        ]
    vec = gc.get_model_metadata("vec")
    assert [list(t.shape) for t in vec.inputs] == [[-1, -1]]
    for name, version in [("nope", ""), ("affine", "9")]:
        with pytest.raises(InferenceServerException) as err:
            gc.get_model_metadata(name, version)
        assert err.value.status() == "StatusCode.NOT_FOUND"

    assert gc.is_model_ready("affine") is True
    assert gc.is_model_ready("affine", "1") is True
    assert gc.is_model_ready("affine", "3") is False
    assert gc.is_model_ready("nope") is False

    index = gc.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        (n, v, "READY") for n, v in INDEX
    ]
    ready_only = gc.get_model_repository_index(as_json=True)
    assert len(ready_only["models"]) == len(INDEX)
