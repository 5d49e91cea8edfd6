"""Bad HTTP requests: each gets its status and ``{"error": ...}``, never a 500 or a
hang; limits on bodies and dimensions; sockets without Nagle."""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.router.helpers import (
    ALICE,
    BIG,
    DIRECTORY_DOWN,
    GOOD_JSON,
    HTTP_ALICE,
    HTTP_BOB,
    K1,
    K_BYTES,
    MAX_BYTES,
    X1,
    X_BYTES,
    Stack,
    assert_affine,
    assert_http_good,
    binary_request,
    http_infer,
    infer_body,
    jk,
    jx,
)

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------
# errors over HTTP: status + {"error": ...}
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    id: str
    status: int
    needle: str
    path: str = "/v2/models/affine/infer"
    json_body: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    auth: Mapping[str, str] | None = None  # defaults to alice

    def send(self, web: httpx.Client) -> httpx.Response:
        headers = dict(HTTP_ALICE if self.auth is None else self.auth)
        headers.update(self.headers or {})
        if self.content is not None:
            return web.post(self.path, content=self.content, headers=headers)
        return web.post(self.path, json=self.json_body, headers=headers)


def _bin(
    id: str,
    status: int,
    needle: str,
    header: dict[str, Any],
    payload: bytes,
    header_length: int | None = None,
    path: str = "/v2/models/affine/infer",
) -> HttpCase:
    content, headers = binary_request(header, payload, header_length)
    return HttpCase(id, status, needle, path=path, content=content, headers=headers)


def _bx(size: int, shape: list[int] | None = None, name: str = "x") -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "FP32",
        "shape": shape if shape is not None else [1, 4],
        "parameters": {"binary_data_size": size},
    }


GOOD_BINARY_HEADER = {"inputs": [_bx(16), jk()]}

HTTP_CASES = [
    # authentication / authorization / routing
    HttpCase("missing-key", 401, "missing API key", json_body=GOOD_JSON, auth={}),
    HttpCase(
        "unknown-key",
        401,
        "unknown API key",
        json_body=GOOD_JSON,
        auth={"Authorization": "Bearer not-a-key"},
    ),
    HttpCase(
        "not-bearer",
        401,
        "malformed Authorization",
        json_body=GOOD_JSON,
        auth={"Authorization": f"Basic {ALICE}"},
    ),
    HttpCase(
        "model-not-allowed",
        403,
        "tenant 'bob' may not use model 'affine'",
        json_body=GOOD_JSON,
        auth=HTTP_BOB,
    ),
    HttpCase(
        "tenant-directory-down",  # 503 (retry later), not 401 and not a crash
        503,
        "cannot authenticate now: tenant directory unavailable",
        json_body=GOOD_JSON,
        auth={"Authorization": f"Bearer {DIRECTORY_DOWN}"},
    ),
    HttpCase(
        "unknown-model",
        404,
        "unknown model 'nope'",
        path="/v2/models/nope/infer",
        json_body=GOOD_JSON,
    ),
    HttpCase(
        "unknown-version",
        404,
        "model 'affine' has no version '9'",
        path="/v2/models/affine/versions/9/infer",
        json_body=GOOD_JSON,
    ),
    # the body
    HttpCase("malformed-json", 400, "malformed JSON", content=b'{"inputs": [}'),
    HttpCase("empty-body", 400, "malformed JSON", content=b""),
    HttpCase("json-not-object", 400, "request must be a JSON object", json_body=[GOOD_JSON]),
    HttpCase("inputs-not-list", 400, "'inputs' must be a list", json_body={"inputs": {}}),
    HttpCase("no-inputs", 400, "request has no inputs", json_body={"inputs": []}),
    HttpCase("input-not-object", 400, "each input must be an object", json_body={"inputs": [1]}),
    HttpCase(
        "input-without-name",
        400,
        "needs a string 'name' and 'datatype'",
        json_body={"inputs": [{"datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    ),
    HttpCase(
        "shape-not-list",
        400,
        "needs a 'shape' list",
        json_body=infer_body([jx() | {"shape": 4}, jk()]),
    ),
    HttpCase(
        "parameters-not-object",
        400,
        "'parameters' must be an object",
        json_body=GOOD_JSON | {"parameters": [1]},
    ),
    HttpCase(
        "outputs-not-list", 400, "'outputs' must be a list", json_body=GOOD_JSON | {"outputs": 1}
    ),
    HttpCase(
        "output-without-name",
        400,
        "needs a string 'name'",
        json_body=GOOD_JSON | {"outputs": [{"parameters": {}}]},
    ),
    # tensors against the signature
    HttpCase(
        "wrong-datatype",
        400,
        "input 'x' has datatype 'FP64', the model expects FP32",
        json_body=infer_body([jx(datatype="FP64"), jk()]),
    ),
    HttpCase(
        "unknown-datatype",
        400,
        "input 'x' has datatype 'BYTES'",
        json_body=infer_body([jx(datatype="BYTES"), jk()]),
    ),
    HttpCase(
        "shape-mismatch",
        400,
        "input 'x' has shape [1, 5]; expected [-1, 4]",
        json_body=infer_body([jx([1, 5], [1, 2, 3, 4, 5]), jk()]),
    ),
    HttpCase(
        "shape-rank",
        400,
        "input 'x' has shape [4]; expected [-1, 4] (batch dimension first)",
        json_body=infer_body([jx([4]), jk()]),
    ),
    HttpCase(
        "json-data-too-short",
        400,
        "input 'x': 3 values for shape [1, 4] (needs 4)",
        json_body=infer_body([jx(data=[1.0, 2.0, 3.0]), jk()]),
    ),
    HttpCase(
        "json-data-too-long",
        400,
        "input 'x': 8 values for shape [1, 4] (needs 4)",
        json_body=infer_body([jx(data=[1.0] * 8), jk()]),
    ),
    HttpCase(
        "json-data-not-numbers",
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=["a", "b", "c", "d"]), jk()]),
    ),
    HttpCase(
        "json-data-ragged",
        400,
        "input 'x': nested data does not match shape",
        json_body=infer_body([jx(data=[[1.0, 2.0], [3.0]]), jk()]),
    ),
    HttpCase(
        "json-float-for-int64",  # numpy alone would truncate 1.5 to 1
        400,
        "input 'k': data is not INT64",
        json_body=infer_body([jx(), jk(data=[1.5])]),
    ),
    HttpCase(
        "json-numeric-strings",  # numpy alone would parse "1" as 1.0
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=["1", "2", "3", "4"]), jk()]),
    ),
    HttpCase(
        "json-null-value",  # numpy alone would make it NaN
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=[None, 2.0, 3.0, 4.0]), jk()]),
    ),
    HttpCase(
        "json-bools-for-fp32",
        400,
        "input 'x': data is not FP32",
        json_body=infer_body([jx(data=[True, False, True, False]), jk()]),
    ),
    HttpCase(
        "json-int64-overflow",
        400,
        "input 'k': data is not INT64",
        json_body=infer_body([jx(), jk(data=[2**63])]),
    ),
    HttpCase(
        "json-fp32-overflow",  # numpy alone would make it infinity
        400,
        "input 'x': data is not FP32: 1e+39 is out of range",
        json_body=infer_body([jx(data=[1.0, 1e39, 3.0, 4.0]), jk()]),
    ),
    HttpCase(
        "json-data-missing",
        400,
        "input 'x' carries no data",
        json_body=infer_body([{"name": "x", "datatype": "FP32", "shape": [1, 4]}, jk()]),
    ),
    HttpCase(
        "negative-dimension",
        400,
        "input 'x' has an invalid dimension -1",
        json_body=infer_body([jx([-1, 4]), jk()]),
    ),
    HttpCase(
        "non-integer-dimension",
        400,
        "input 'x' has an invalid dimension 4.0",
        json_body=infer_body([jx([1, 4.0]), jk()]),
    ),
    HttpCase(
        "zero-rows",
        400,
        "input 'x' has batch size 0; the model takes 1..64",
        json_body=infer_body([jx([0, 4], []), jk([0, 1], [])]),
    ),
    HttpCase(
        "unknown-input",
        400,
        "unknown input 'z'; the model takes: k, x",
        json_body=infer_body([jx(), jk(), jx(name="z")]),
    ),
    HttpCase(
        "duplicate-input",
        400,
        "input 'x' given twice",
        json_body=infer_body([jx(), jk(), jx()]),
    ),
    HttpCase("missing-input", 400, "missing input(s): k", json_body=infer_body([jx()])),
    HttpCase(
        "batch-disagreement",
        400,
        "inputs disagree on the batch dimension: 2 and 1 ('k')",
        json_body=infer_body([jx([2, 4], [1.0] * 8), jk()]),
    ),
    HttpCase(
        "batch-over-max",
        400,
        "input 'x' has batch size 65; the model takes 1..64",
        json_body=infer_body([jx([65, 4], [1.0] * 260), jk([65, 1], [1] * 65)]),
    ),
    HttpCase(
        "unknown-output",
        400,
        "unknown output(s) requested: nope",
        json_body=GOOD_JSON | {"outputs": [{"name": "y"}, {"name": "nope"}]},
    ),
    # the binary extension
    _bin(
        "raw-too-short",
        400,
        "input 'x': 12 bytes of data",
        {"inputs": [_bx(12), jk()]},
        X_BYTES[:12],
    ),
    _bin(
        "raw-too-long",
        400,
        "input 'x': 20 bytes of data for shape [1, 4] of FP32 (needs 16)",
        {"inputs": [_bx(20), jk()]},
        X_BYTES + b"\0" * 4,
    ),
    _bin(
        "binary-sizes-short-of-body",
        400,
        "binary data is 24 bytes but inputs declare 16",
        GOOD_BINARY_HEADER,
        X_BYTES + K_BYTES,
    ),
    _bin(
        "binary-sizes-past-body",
        400,
        "input 'k': binary_data_size 8 runs past the 16 bytes of binary data",
        {"inputs": [_bx(16), _bx(8, [1, 1], "k") | {"datatype": "INT64"}]},
        X_BYTES,
    ),
    _bin(
        "binary-size-negative",
        400,
        "input 'x': bad binary_data_size -16",
        {"inputs": [_bx(-16), jk()]},
        X_BYTES,
    ),
    _bin(
        "header-length-past-body",
        400,
        "does not fit",
        GOOD_BINARY_HEADER,
        X_BYTES,
        header_length=10_000,
    ),
    _bin("header-length-short", 400, "malformed JSON", GOOD_BINARY_HEADER, X_BYTES, 5),
    HttpCase(
        "header-length-not-a-number",
        400,
        "Inference-Header-Content-Length '-3'",
        content=json.dumps(GOOD_JSON).encode(),
        headers={"Inference-Header-Content-Length": "-3"},
    ),
    # parameters
    *[
        HttpCase(
            f"bad-timeout-{v!r}",
            400,
            "parameter 'timeout' must be a positive integer (microseconds)",
            json_body=GOOD_JSON | {"parameters": {"timeout": v}},
        )
        for v in (-5, 0, 1.5, "soon", True, None)
    ],
    *[
        HttpCase(
            f"bad-priority-{v!r}",
            400,
            "parameter 'priority' must be 0 (default) or a level 1..3",
            json_body=GOOD_JSON | {"parameters": {"priority": v}},
        )
        for v in (-1, "high", 2.0, False, 4, 2**31)
    ],
    # encodings
    HttpCase(
        "unsupported-encoding",
        400,
        "unsupported Content-Encoding 'br'",
        content=json.dumps(GOOD_JSON).encode(),
        headers={"Content-Encoding": "br"},
    ),
    HttpCase(
        "corrupt-gzip",
        400,
        "body is not valid gzip",
        content=b"definitely not gzip",
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "truncated-gzip",  # trailer (CRC, size) cut off: the checksum was never verified
        400,
        "body is not valid gzip: truncated stream",
        content=gzip.compress(json.dumps(GOOD_JSON).encode())[:-8],
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "gzip-then-garbage",
        400,
        "body is not valid gzip: data after the end of the stream",
        content=gzip.compress(json.dumps(GOOD_JSON).encode()) + b"junk",
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "gzip-two-members",  # the second member must not be dropped silently
        400,
        "body is not valid gzip: data after the end of the stream",
        content=gzip.compress(b'{"inputs": ') + gzip.compress(b"[]}"),
        headers={"Content-Encoding": "gzip"},
    ),
    HttpCase(
        "truncated-deflate",
        400,
        "body is not valid deflate: truncated stream",
        content=zlib.compress(json.dumps(GOOD_JSON).encode())[:-4],
        headers={"Content-Encoding": "deflate"},
    ),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_http_errors(web: httpx.Client, case: HttpCase) -> None:
    r = case.send(web)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"]
    assert case.needle in body["error"], body["error"]
    assert "secret" not in body["error"]


def test_http_absurd_dimensions_are_refused_without_allocating(web: httpx.Client) -> None:
    cases = [
        # affine: the huge dim cannot match the signature's 4
        ("affine", {"inputs": [_bx(4, [1, BIG]), jk()]}, "expected [-1, 4]"),
        # affine: a huge batch dimension
        ("affine", {"inputs": [_bx(4, [BIG, 4]), jk()]}, "batch size 1000000000000"),
        # vec: a variable dimension, so only the byte budget stops it
        ("vec", {"inputs": [_bx(4, [1, BIG], "v")]}, "byte request limit"),
        ("vec", {"inputs": [_bx(4, [8, 2**62], "v")]}, "byte request limit"),
        ("vec", {"inputs": [_bx(4, [1, 2**64 - 1], "v")]}, "byte request limit"),
        # a dimension too big for 64 bits parses as a float: an invalid dimension
        ("vec", {"inputs": [_bx(4, [1, 10**30], "v")]}, "invalid dimension"),
    ]
    for model, header, needle in cases:
        content, headers = binary_request(header, b"\0" * 4)
        started = time.perf_counter()
        r = web.post(f"/v2/models/{model}/infer", content=content, headers=headers | HTTP_ALICE)
        elapsed = time.perf_counter() - started
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]
        assert elapsed < 0.5, f"{header} took {elapsed:.3f}s"
    # The same through JSON "data".
    body = {"inputs": [{"name": "v", "datatype": "FP32", "shape": [1, BIG], "data": [1.0]}]}
    started = time.perf_counter()
    r = web.post("/v2/models/vec/infer", json=body, headers=HTTP_ALICE)
    assert r.status_code == 400 and "byte request limit" in r.json()["error"]
    assert time.perf_counter() - started < 0.5
    # vec itself works with a modest variable length.
    body = {"inputs": [{"name": "v", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3.5]}]}
    r = web.post("/v2/models/vec/infer", json=body, headers=HTTP_BOB)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [6.5]


def test_http_body_over_limit(web: httpx.Client, hc: httpclient.InferenceServerClient) -> None:
    # Declared by Content-Length.
    big = b"{" + b" " * (MAX_BYTES + 10) + b"}"
    r = web.post("/v2/models/affine/infer", content=big, headers=HTTP_ALICE)
    assert r.status_code == 413
    assert "over the 1048576-byte limit" in r.json()["error"]

    # Streamed (chunked: no Content-Length).
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * (MAX_BYTES // 8)

    r = web.post("/v2/models/affine/infer", content=chunks(), headers=HTTP_ALICE)
    assert r.status_code == 413
    assert "over the 1048576-byte limit" in r.json()["error"]

    # A small gzip body that inflates past the limit.
    bomb = gzip.compress(b" " * (4 * MAX_BYTES))
    assert len(bomb) < MAX_BYTES
    r = web.post(
        "/v2/models/affine/infer",
        content=bomb,
        headers=HTTP_ALICE | {"Content-Encoding": "gzip"},
    )
    assert r.status_code == 413
    assert "decompressed body is over" in r.json()["error"]

    # tritonclient.http gets the 413 (not a reset connection) and its client stays usable.
    n = MAX_BYTES // 4 + 1024
    big_input = httpclient.InferInput("v", [1, n], "FP32")
    big_input.set_data_from_numpy(np.zeros((1, n), dtype=np.float32))
    for _ in range(2):
        with pytest.raises(InferenceServerException) as err:
            hc.infer("vec", [big_input], headers=dict(HTTP_ALICE))
        assert err.value.status() == "413"
        assert "over the 1048576-byte limit" in err.value.message()
    assert_affine(http_infer(hc, X1, K1), X1, K1)
    assert_http_good(web)


def test_http_errors_through_tritonclient(hc: httpclient.InferenceServerClient) -> None:
    """tritonclient.http surfaces the status and the server's message."""
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"headers": {}}, "401", "missing API key"),
        ({"headers": {"Authorization": "Bearer wrong"}}, "401", "unknown API key"),
        ({"headers": HTTP_BOB}, "403", "may not use model"),
        ({"model": "nope"}, "404", "unknown model"),
        ({"model_version": "7"}, "404", "has no version '7'"),
        ({"outputs": [httpclient.InferRequestedOutput("q")]}, "400", "unknown output"),
        ({"priority": 2**31}, "400", "priority"),
    ]
    for kwargs, status, needle in cases:
        with pytest.raises(InferenceServerException) as err:
            http_infer(hc, X1, K1, **kwargs)
        assert err.value.status() == status, (kwargs, err.value)
        assert needle in err.value.message()
    # Wrong datatype and shape through the client's own tensor types.
    ix = httpclient.InferInput("x", [1, 4], "FP64")
    ix.set_data_from_numpy(X1.astype(np.float64))
    ik = httpclient.InferInput("k", [1, 1], "INT64")
    ik.set_data_from_numpy(K1)
    with pytest.raises(InferenceServerException) as err:
        hc.infer("affine", [ix, ik], headers=dict(HTTP_ALICE))
    assert err.value.status() == "400" and "FP64" in err.value.message()
    assert_affine(http_infer(hc, X1, K1), X1, K1)


def test_http_connections_send_without_nagle(stack: Stack, web: httpx.Client) -> None:
    """Accepted HTTP connections have TCP_NODELAY, on asyncio's own loop too (this
    stack's). Without it every answer uvicorn writes as head then body waited for the
    client's delayed ACK: 44 ms per POST, before the listening socket named its
    protocol (asyncio sets the option only on IPPROTO_TCP sockets)."""
    assert_http_good(web)  # web's keep-alive connection stays open
    assert stack.doors._http is not None
    connections = stack.doors._http.server_state.connections
    assert connections
    for connection in connections:
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_non_decimal_header_length_is_400_not_500(web: httpx.Client) -> None:
    body = json.dumps(infer_body([jx(data=[1.0, 2.0, 3.0, 4.0]), jk(data=[1])])).encode()
    for value in ("\u00b2".encode("latin-1"), b"9" * 5000, b"-1"):
        r = web.post(
            "/v2/models/affine/infer",
            content=body,
            headers={
                "Authorization": f"Bearer {ALICE}",
                "Inference-Header-Content-Length": value,  # type: ignore[dict-item]
            },
        )
        assert r.status_code == 400, (value[:8], r.text)
        assert "Inference-Header-Content-Length" in r.json()["error"]
    assert_http_good(web)


def test_open_repository_index_reads_only_a_small_body(web: httpx.Client) -> None:
    r = web.post("/v2/repository/index", content=b" " * (1 << 20))
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert web.post("/v2/repository/index", content=b"{}").status_code == 200
