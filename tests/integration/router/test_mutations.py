"""Seeded mutations of good requests over both protocols, then the servers still
serving with no 500 beyond the models that fail on purpose."""

from __future__ import annotations

import collections
import json
import random
from typing import Any

import grpc
import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

from router.grpc_server import INFER_METHOD
from tests.integration.router.helpers import (
    DIRECTORY_DOWN,
    GOOD_JSON,
    HTTP_ALICE,
    INVALID,
    MD_ALICE,
    Stack,
    assert_affine,
    assert_grpc_good,
    assert_http_good,
    grpc_infer,
    http_infer,
    infer_body,
    jk,
    jx,
    raw_request,
    request_codes,
    sample,
    typed_request,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


# Values a mutation puts where a request field was (kinds and sizes a field must refuse).
_ODD_VALUES: list[Any] = [
    None, True, -1, 0, 3, 2**31, 2**63, 2**70, -(2**63), 1e308, -0.5, "", "x", "FP32",
    "BYTES", [], {}, [1], [[1, 2]], [-1], [1, 4], {"a": 1}, "NaN",
]  # fmt: skip
_INFER_OK_HTTP = frozenset({200, 400, 404, 413, 504})
_INFER_OK_GRPC = frozenset(
    {
        grpc.StatusCode.OK,
        INVALID,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a mutated timeout; the call gets 10 s
    }
)


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:
        del out[rng.randrange(len(out)) :]
    elif kind == 2:
        at = rng.randrange(len(out) + 1)
        out[at:at] = rng.randbytes(rng.randint(1, 8))
    else:
        a, b = sorted(rng.randrange(len(out) + 1) for _ in range(2))
        out[a:a] = out[a:b]
    return bytes(out)


def _mutate_json(value: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Replace, drop or add one node anywhere in a JSON request."""
    slots: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            slots.append((node, key))
            if isinstance(child, dict | list) and child:
                walk(child)

    walk(value)
    parent, key = rng.choice(slots)
    roll = rng.random()
    if roll < 0.7:
        parent[key] = rng.choice(_ODD_VALUES)
    elif isinstance(parent, dict) and roll < 0.85:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["parameters", "outputs", "binary_data_size", "zz"])] = rng.choice(
            _ODD_VALUES
        )
    else:
        parent.append(rng.choice(_ODD_VALUES))
    return value


def _mutated_http(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    rows = rng.randint(1, 3)
    x, k = sample(rows, seed=rng.randrange(1000))
    binary = rng.random() < 0.5
    body: dict[str, Any] = infer_body(
        [jx([rows, 4], x.ravel().tolist()), jk([rows, 1], k.ravel().tolist())],
        outputs=[{"name": "y", "parameters": {"binary_data": binary}}, {"name": "s"}],
        parameters={"timeout": 5_000_000, "priority": 1},
    )
    headers = dict(HTTP_ALICE)
    path = f"/v2/models/{rng.choice(['affine', 'vec'])}/infer"
    roll = rng.random()
    if roll < 0.4:
        return path, json.dumps(_mutate_json(body, rng)).encode(), headers
    if roll < 0.6:
        return path, _mutate_bytes(json.dumps(body).encode(), rng), headers
    payloads = [x.tobytes(), k.tobytes()]
    for item, payload in zip(body["inputs"], payloads, strict=True):
        del item["data"]
        item["parameters"] = {"binary_data_size": len(payload)}
    if rng.random() < 0.5:
        body = _mutate_json(body, rng)
    head = json.dumps(body).encode()
    tail = b"".join(payloads)
    length = len(head)
    if rng.random() < 0.3:
        length = rng.choice([-1, 0, length - 1, length + 1, 2**40, len(head) + len(tail) + 5])
    elif rng.random() < 0.4:
        tail = _mutate_bytes(tail, rng)
    headers["Inference-Header-Content-Length"] = str(length)
    return path, head + tail, headers


def _mutated_grpc(rng: random.Random) -> bytes:
    rows = rng.randint(1, 3)
    x, k = sample(rows, seed=rng.randrange(1000))
    model = rng.choice(["affine", "vec"])
    request = raw_request(x, k, model) if rng.random() < 0.7 else typed_request(x, k, model)
    if rng.random() < 0.5:
        return _mutate_bytes(request.SerializeToString(), rng)
    for _ in range(rng.randint(1, 3)):
        tensor = request.inputs[rng.randrange(len(request.inputs))]
        field = rng.randrange(6)
        if field == 0:
            dims = [-(2**62), -1, 0, 1, 2, 4, 2**31, 2**62]
            tensor.shape[:] = [rng.choice(dims) for _ in range(rng.randint(0, 4))]
        elif field == 1:
            tensor.datatype = rng.choice(["", "BYTES", "BF16", "FP64", "BOOL", "FP16", "fp32"])
        elif field == 2 and request.raw_input_contents:
            at = rng.randrange(len(request.raw_input_contents))
            request.raw_input_contents[at] = rng.randbytes(rng.randint(0, 40))
        elif field == 3:
            request.parameters[rng.choice(["timeout", "priority"])].CopyFrom(
                rng.choice(
                    [
                        pb.InferParameter(int64_param=-5),
                        pb.InferParameter(int64_param=2**62),
                        pb.InferParameter(uint64_param=2**64 - 1),
                        pb.InferParameter(string_param="soon"),
                        pb.InferParameter(double_param=float("nan")),
                        pb.InferParameter(),
                    ]
                )
            )
        elif field == 4:
            request.outputs.add(name=rng.choice(["y", "s", "zz", ""]))
        else:
            request.model_version = rng.choice(["1", "2", "", "0", "x" * 300])
    return request.SerializeToString()


def test_mutated_requests_get_protocol_errors(
    stack: Stack, web: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Seeded mutations of good infer requests (bytes cut, flipped, inserted or
    repeated; a JSON node or a protobuf field given an odd value): every one is
    answered in the protocol's own form, never a 5xx, INTERNAL or UNKNOWN; every
    call ends, and good requests still succeed."""
    rng = random.Random(20261204)
    answered: collections.Counter[Any] = collections.Counter()
    for _ in range(300):
        path, content, headers = _mutated_http(rng)
        response = web.post(path, content=content, headers=headers)
        answered[response.status_code] += 1
        assert response.status_code in _INFER_OK_HTTP, (content, response.text)
        if response.status_code != 200:
            assert isinstance(response.json()["error"], str), response.text
    with grpc.insecure_channel(stack.grpc_url) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        for _ in range(300):
            data = _mutated_grpc(rng)
            try:
                infer(data, metadata=MD_ALICE, timeout=10)
                answered[grpc.StatusCode.OK] += 1
            except grpc.RpcError as err:
                answered[err.code()] += 1
                assert err.code() in _INFER_OK_GRPC, (data, err.code(), err.details())
    # The mutations reach past the first checks: some still succeed, most are refused.
    assert answered[200] >= 5 and answered[400] >= 150, answered
    assert answered[grpc.StatusCode.OK] >= 5 and answered[INVALID] >= 150, answered
    wait_for(lambda: stack.service.in_flight == 0)
    assert_http_good(web)
    assert_grpc_good(stub)


def _fail_on_purpose(web: httpx.Client) -> None:
    """One request of each failure that test_still_serving_after_errors counts."""
    x, k = sample(6, seed=8)
    six_rows = infer_body([jx([6, 4], x.ravel().tolist()), jk([6, 1], k.ravel().tolist())])
    failures = [
        ("broken", GOOD_JSON, HTTP_ALICE, 500),
        ("misfit", six_rows, HTTP_ALICE, 500),  # more rows than its batcher takes
        ("affine", infer_body([jx([1, 3], [1.0, 2.0, 3.0]), jk()]), HTTP_ALICE, 400),
        ("affine", GOOD_JSON, {}, 401),
        ("affine", GOOD_JSON, {"Authorization": f"Bearer {DIRECTORY_DOWN}"}, 503),
    ]
    for model, body, headers, status in failures:
        r = web.post(f"/v2/models/{model}/infer", json=body, headers=headers)
        assert r.status_code == status, (model, r.text)


def test_still_serving_after_errors(
    stack: Stack,
    web: httpx.Client,
    stub: pb_grpc.GRPCInferenceServiceStub,
    hc: httpclient.InferenceServerClient,
    gc: grpcclient.InferenceServerClient,
) -> None:
    """This module sorts after the others that use the main stacks, so the count covers
    every request they sent; the requests that fail on purpose are sent here too, so
    that it also holds when run alone."""
    _fail_on_purpose(web)
    assert stack.doors.healthy
    assert_http_good(web)
    assert_grpc_good(stub)
    x, k = sample(8, seed=77)
    assert_affine(http_infer(hc, x, k), x, k)
    assert_affine(grpc_infer(gc, x, k), x, k)
    # No request ended as a 500 except the deliberately broken / misconfigured models'.
    codes = request_codes(stack)
    assert {m for m, c in codes if c == "500"} == {"broken", "misfit"}
    assert codes[("affine", "400")] > 0 and codes[("-", "401")] > 0
    assert codes[("-", "503")] > 0  # the tenant directory failing
