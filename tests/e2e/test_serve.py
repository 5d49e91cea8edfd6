"""`gpugate serve` as a user runs it, driven by the unchanged tritonclient.

One gateway (local Ray, SQLite state in a temp dir, the demo digits model) serves
every test of this module; the last test stops it with SIGTERM under load.
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Gateway, wait_for

pytestmark = pytest.mark.timeout(300)

X, Y = load_digits(return_X_y=True)
X = X.astype(np.float32)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _http_infer(gw: Gateway, x: np.ndarray, key: str, binary: bool = True, **kw: object):
    client = thttp.InferenceServerClient(gw.http_url)
    inp = thttp.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = thttp.InferRequestedOutput("logits", binary_data=binary)
    return client.infer("digits", [inp], outputs=[out], headers=_auth(key), **kw)


def _grpc_infer(
    gw: Gateway, x: np.ndarray, key: str, client: tgrpc.InferenceServerClient | None = None
):
    client = client or tgrpc.InferenceServerClient(gw.grpc_url)
    inp = tgrpc.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("digits", [inp], headers={"authorization": f"Bearer {key}"})


def test_health_metadata_and_index(gateway: Gateway) -> None:
    h = thttp.InferenceServerClient(gateway.http_url)
    g = tgrpc.InferenceServerClient(gateway.grpc_url)
    assert h.is_server_live() and h.is_server_ready()
    assert g.is_server_live() and g.is_server_ready()
    assert h.is_model_ready("digits") and g.is_model_ready("digits", "1")
    assert not h.is_model_ready("nope") and not g.is_model_ready("nope")
    meta = h.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    gmeta = g.get_model_metadata("digits", as_json=True)
    assert gmeta["versions"] == ["1"] and gmeta["inputs"][0]["shape"] == ["-1", "64"]
    assert h.get_server_metadata()["name"] == "gpugate"
    assert h.get_model_repository_index() == [
        {"name": "digits", "version": "1", "state": "READY", "reason": ""}
    ]
    index = g.get_model_repository_index(as_json=True)
    assert index["models"][0]["name"] == "digits"


def test_demo_model_classifies_digits_over_every_encoding(gateway: Gateway) -> None:
    key = gateway.demo_key
    x = X[:64]
    binary = _http_infer(gateway, x, key).as_numpy("logits")
    as_json = _http_infer(gateway, x, key, binary=False).as_numpy("logits")
    over_grpc = _grpc_infer(gateway, x, key).as_numpy("logits")
    np.testing.assert_allclose(binary, over_grpc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(binary, as_json, rtol=1e-5, atol=1e-5)
    accuracy = float((binary.argmax(1) == Y[:64]).mean())
    assert accuracy >= 0.9
    result = _http_infer(gateway, X[:2], key)
    assert result.get_response()["model_version"] == "1"


def test_model_config_and_statistics_through_tritonclient(gateway: Gateway) -> None:
    h = thttp.InferenceServerClient(gateway.http_url)
    g = tgrpc.InferenceServerClient(gateway.grpc_url)
    config = h.get_model_config("digits")
    assert config["max_batch_size"] == 64 and config["backend"] == "pytorch"
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["instance_group"] == [{"name": "digits", "kind": "KIND_CPU", "count": 1}]
    gconfig = g.get_model_config("digits", "1").config
    assert (gconfig.max_batch_size, list(gconfig.input[0].dims)) == (64, [64])
    assert gconfig.dynamic_batching.priority_levels == 3

    def stats() -> dict:
        found = h.get_inference_statistics("digits")["model_stats"]
        assert [(s["name"], s["version"]) for s in found] == [("digits", "1")]
        return found[0]

    before = stats()
    for rows in (1, 5, 3):
        _grpc_infer(gateway, X[:rows], gateway.demo_key)
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 9
    done = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    assert done == 3
    # The forward's device time, measured in the replica, is what "compute_infer" sums.
    infer_ns = after["inference_stats"]["compute_infer"]["ns"]
    assert infer_ns - before["inference_stats"]["compute_infer"]["ns"] > 0
    gstats = g.get_inference_statistics("digits", "1").model_stats[0]  # nothing ran since
    assert gstats.inference_count == after["inference_count"]
    assert gstats.inference_stats.compute_infer.ns == infer_ns


def test_concurrent_requests_of_different_sizes_get_their_own_rows(gateway: Gateway) -> None:
    key = gateway.demo_key
    rng = np.random.default_rng(1)
    batches = []
    start = 0
    for _ in range(60):
        n = int(rng.integers(1, 9))
        batches.append(X[start % 1700 : start % 1700 + n])
        start += n
    alone = [_grpc_infer(gateway, b, key).as_numpy("logits") for b in batches]
    grpc_client = tgrpc.InferenceServerClient(gateway.grpc_url)

    def send(i: int) -> np.ndarray:
        if i % 2:
            return _grpc_infer(gateway, batches[i], key, grpc_client).as_numpy("logits")
        return _http_infer(gateway, batches[i], key).as_numpy("logits")

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(send, range(len(batches))))
    for a, t, b in zip(alone, together, batches, strict=True):
        assert t.shape == (len(b), 10)
        np.testing.assert_allclose(t, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_errors_in_the_protocols_own_form(gateway: Gateway, protocol: str) -> None:
    key = gateway.demo_key
    x = X[:2]

    def code_of(fn) -> str:  # type: ignore[no-untyped-def]
        with pytest.raises(InferenceServerException) as info:
            fn()
        return str(info.value.status())

    if protocol == "http":
        h = thttp.InferenceServerClient(gateway.http_url)
        assert code_of(lambda: _http_infer(gateway, x, "")) == "401"
        assert code_of(lambda: _http_infer(gateway, x, "gg_not_a_key")) == "401"
        inp = thttp.InferInput("pixels", [2, 64], "FP32")
        inp.set_data_from_numpy(x)
        assert code_of(lambda: h.infer("nope", [inp], headers=_auth(key))) == "404"
        assert (
            code_of(lambda: h.infer("digits", [inp], model_version="9", headers=_auth(key)))
            == "404"
        )
        wrong = thttp.InferInput("pixels", [2, 64], "INT32")
        wrong.set_data_from_numpy(x.astype(np.int32))
        assert code_of(lambda: h.infer("digits", [wrong], headers=_auth(key))) == "400"
        bad_shape = thttp.InferInput("pixels", [2, 32], "FP32")
        bad_shape.set_data_from_numpy(x[:, :32].copy())
        assert code_of(lambda: h.infer("digits", [bad_shape], headers=_auth(key))) == "400"
    else:
        g = tgrpc.InferenceServerClient(gateway.grpc_url)
        assert code_of(lambda: _grpc_infer(gateway, x, "")) == "StatusCode.UNAUTHENTICATED"
        inp = tgrpc.InferInput("pixels", [2, 64], "FP32")
        inp.set_data_from_numpy(x)
        hdr = {"authorization": f"Bearer {key}"}
        assert code_of(lambda: g.infer("nope", [inp], headers=hdr)) == "StatusCode.NOT_FOUND"
        wrong = tgrpc.InferInput("pixels", [2, 64], "FP64")
        wrong.set_data_from_numpy(x.astype(np.float64))
        assert code_of(lambda: g.infer("digits", [wrong], headers=hdr)) == (
            "StatusCode.INVALID_ARGUMENT"
        )
    # The server is still up and answering.
    assert _grpc_infer(gateway, x, key).as_numpy("logits").shape == (2, 10)


def test_huge_declared_shape_and_oversized_body_are_refused_fast(gateway: Gateway) -> None:
    url = f"http://{gateway.http_url}/v2/models/digits/infer"
    body = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 10**12], "data": [1]}]}
    ).encode()
    req = urllib.request.Request(url, body, headers=_auth(gateway.demo_key), method="POST")
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 400
    assert "error" in json.loads(info.value.read())
    assert time.monotonic() - t0 < 2
    # Declare a body over the 64 MiB limit and send only the headers: the gateway
    # answers 413 from the Content-Length alone, before reading (or storing) a byte.
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 70000000\r\nAuthorization: Bearer "
            + gateway.demo_key.encode()
            + b"\r\n\r\n"
        )
        # Headers and body may arrive in separate segments: read until the body is in.
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            raw += chunk
        reply = raw.decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"error"' in reply
    assert _grpc_infer(gateway, X[:1], gateway.demo_key).as_numpy("logits").shape == (1, 10)


def _http_post(gw: Gateway, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
    try:
        conn.request("POST", path, body, {**_auth(gw.demo_key), **headers})
        reply = conn.getresponse()
        status, text = reply.status, reply.read().decode()
    finally:
        conn.close()
    assert list(json.loads(text)) == ["error"], text
    return status, json.loads(text)["error"]


def _pixels(shape: list[int], **extra: object) -> dict[str, object]:
    return {"name": "pixels", "datatype": "FP32", "shape": shape, **extra}


def test_malformed_http_requests_get_400_naming_the_problem(gateway: Gateway) -> None:
    """Each case the protocol section of the README lists, against the real gateway."""
    infer = "/v2/models/digits/infer"
    row = [0.0] * 64
    as_json = {"Content-Type": "application/json"}
    cases: list[tuple[bytes, dict[str, str], str]] = [
        (b'{"inputs": [', as_json, "malformed JSON"),
        (json.dumps({"inputs": [_pixels([1, 64], data=row[:63])]}).encode(), as_json, "63 values"),
        (
            json.dumps({"inputs": [_pixels([-1, 64], data=row)]}).encode(),
            as_json,
            "invalid dimension -1",
        ),
        (
            json.dumps({"inputs": [_pixels([10**6, 64], data=row)]}).encode(),
            as_json,
            "batch size 1000000;",
        ),
        (
            json.dumps({"inputs": [{**_pixels([1, 64], data=row), "name": "pixelz"}]}).encode(),
            as_json,
            "unknown input 'pixelz'",
        ),
        (json.dumps({"inputs": [_pixels([1, 64], data=["a"] * 64)]}).encode(), as_json, "not FP32"),
    ]
    # Triton's binary extension: the header promises 256 bytes, 100 follow.
    header = json.dumps(
        {"inputs": [_pixels([1, 64], parameters={"binary_data_size": 256})]}
    ).encode()
    cases.append(
        (
            header + b"\0" * 100,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
            "binary_data_size 256 runs past the 100 bytes",
        )
    )
    for body, headers, needle in cases:
        status, error = _http_post(gateway, infer, body, headers)
        assert status == 400, (body[:80], status, error)
        assert needle in error, (body[:80], error)
    good = json.dumps({"inputs": [_pixels([1, 64], data=row)]}).encode()
    assert _http_post(gateway, "/v2/models/digits/versions/9/infer", good, as_json)[0] == 404
    assert _grpc_infer(gateway, X[:1], gateway.demo_key).as_numpy("logits").shape == (1, 10)


def test_malformed_grpc_requests_get_their_status_codes(gateway: Gateway) -> None:
    """Requests tritonclient would never build, sent with the generated stub."""

    def request(
        shape: list[int], raw: bytes | None = None, name: str = "pixels", **kw: str
    ) -> pb.ModelInferRequest:
        msg = pb.ModelInferRequest(model_name="digits", **kw)
        msg.inputs.add(name=name, datatype="FP32", shape=shape)
        msg.raw_input_contents.append(X[:1].tobytes() if raw is None else raw)
        return msg

    typed = pb.ModelInferRequest(model_name="digits")
    typed.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    typed.inputs[0].contents.fp32_contents.extend([0.0] * 63)
    cases: list[tuple[pb.ModelInferRequest, grpc.StatusCode, str]] = [
        (request([1, 64], raw=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT, "100 bytes"),
        (request([-1, 64]), grpc.StatusCode.INVALID_ARGUMENT, "invalid dimension -1"),
        (
            request([1, 64], name="pixelz"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown input 'pixelz'",
        ),
        (request([2, 32]), grpc.StatusCode.INVALID_ARGUMENT, "expected [-1, 64]"),
        (request([10**12, 64]), grpc.StatusCode.INVALID_ARGUMENT, "batch size 1000000000000"),
        (typed, grpc.StatusCode.INVALID_ARGUMENT, "63 values"),
        (request([1, 64], model_version="9"), grpc.StatusCode.NOT_FOUND, "no version '9'"),
        # Over server.max_request_bytes (64 MiB): gRPC's own limit answers.
        (
            request([1, 64], raw=b"\0" * (65 << 20)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
    ]
    options = [("grpc.max_send_message_length", 128 << 20)]
    with grpc.insecure_channel(gateway.grpc_url, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        auth = (("authorization", f"Bearer {gateway.demo_key}"),)
        for msg, code, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(msg, metadata=auth, timeout=20)
            err = info.value
            assert err.code() == code, (msg.inputs[0].shape, err.code(), err.details())
            assert needle in (err.details() or ""), (msg.inputs[0].shape, err.details())
        answer = stub.ModelInfer(request([1, 64]), metadata=auth, timeout=20)
        assert len(answer.raw_output_contents[0]) == 10 * 4


def test_tenant_created_while_running_works_at_once_and_is_scoped(gateway: Gateway) -> None:
    made = gateway.cli("tenants", "create", "alice", "--weight", "2", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["tenant"] == "alice" and created["api_key"].startswith("gg_")
    out = _grpc_infer(gateway, X[:3], created["api_key"]).as_numpy("logits")
    assert out.shape == (3, 10)
    scoped = gateway.cli("tenants", "create", "bob", "--models", "other-model", "--json")
    bob_key = json.loads(scoped.stdout)["api_key"]
    with pytest.raises(InferenceServerException) as info:
        _http_infer(gateway, X[:1], bob_key)
    assert str(info.value.status()) == "403"
    dup = gateway.cli("tenants", "create", "alice", "--json")
    assert dup.returncode != 0 and "already exists" in dup.stderr
    listed = json.loads(gateway.cli("tenants", "list", "--json").stdout)
    assert {"alice", "bob", "demo"} <= {t["tenant"] for t in listed}
    assert created["api_key"] not in json.dumps(listed)
    # Revocation takes effect without a restart, within the directory's cache TTL.
    gone = gateway.cli("tenants", "delete", "alice")
    assert gone.returncode == 0, gone.stderr
    deadline = time.monotonic() + 10
    status = ""
    while time.monotonic() < deadline:
        try:
            _http_infer(gateway, X[:1], created["api_key"])
        except InferenceServerException as exc:
            status = str(exc.status())
            break
        time.sleep(0.2)
    assert status == "401"


def test_metrics_count_requests_per_tenant(gateway: Gateway) -> None:
    before = gateway.metric("gpugate_requests_total", tenant="demo", code="200")
    _grpc_infer(gateway, X[:1], gateway.demo_key)
    assert gateway.metric("gpugate_requests_total", tenant="demo", code="200") == before + 1
    assert gateway.metric("gpugate_batch_size_rows_bucket", model="digits", le="+Inf") >= 1


def _open_slow_http_infer(
    gw: Gateway, x: np.ndarray, key: str
) -> tuple[http.client.HTTPConnection, bytes]:
    """An HTTP infer call whose body is half sent: the gateway has admitted it (the body
    is read inside the request) and holds it until the rest comes. Returns the
    connection and the rest of the body (``conn.send(rest)``, then ``getresponse()``)."""
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=60)
    conn.putrequest("POST", "/v2/models/digits/infer")
    for name, value in {**_auth(key), "Content-Type": "application/json"}.items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(body)))
    half = len(body) // 2
    conn.endheaders(body[:half])
    return conn, body[half:]


def test_sigterm_drains_in_flight_requests_and_exits_zero(gateway: Gateway) -> None:
    """Last test of the module: it stops the shared gateway.

    One request is held inside the gateway across the SIGTERM (its body half sent), so
    the drain has something in flight whatever the timing; 16 clients in a closed loop
    race the shutdown beside it."""
    key = gateway.demo_key
    alone = _http_infer(gateway, X[:2], key, binary=False).as_numpy("logits")
    assert gateway.metric("gpugate_requests_in_flight") == 0
    slow, rest = _open_slow_http_infer(gateway, X[:2], key)
    wait_for(
        "the half-sent request to be admitted",
        lambda: gateway.metric("gpugate_requests_in_flight") == 1,
        30,
        0.05,
    )

    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def hammer() -> None:
        client = tgrpc.InferenceServerClient(gateway.grpc_url)
        while not stop.is_set():
            try:
                out = _grpc_infer(gateway, X[:4], key, client).as_numpy("logits")
                outcome = "ok" if out.shape == (4, 10) else "wrong"
            except InferenceServerException as exc:
                outcome = f"{exc.status()}: {exc.message()}"
            with lock:
                outcomes.append(outcome)
            if outcome != "ok":
                return

    answered_earlier = gateway.metric("gpugate_requests_total", tenant="demo", code="200")
    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    with lock:
        before = outcomes.count("ok")
    with ThreadPoolExecutor(1) as pool:
        stopped = pool.submit(gateway.stop)  # SIGTERM, then waits for the exit

        # The gateway is draining once it refuses new calls; the held request still waits.
        def refused() -> bool:
            with lock:
                return any(o.startswith("StatusCode.UNAVAILABLE") for o in outcomes)

        wait_for("the gateway to refuse new calls", refused, 60, 0.05)
        assert not stopped.done()
        slow.send(rest)
        response = slow.getresponse()
        status, answer = response.status, json.loads(response.read())
        slow.close()
        code = stopped.result(timeout=120)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert code == 0
    assert before > 0
    # Every request either completed correctly or was refused cleanly as unavailable.
    refused = [o for o in outcomes if o != "ok"]
    assert all(o.startswith("StatusCode.UNAVAILABLE") and "draining" in o for o in refused), set(
        refused
    )
    # The request held across the SIGTERM was answered, with its own rows.
    assert status == 200, (status, answer)
    (logits,) = answer["outputs"]
    got = np.asarray(logits["data"], dtype=np.float32).reshape(logits["shape"])
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)
    drained = [line for line in gateway.lines if line.startswith("gpugate drained")]
    assert drained and "completed=True" in drained[0]
    in_flight = int(drained[0].split("in_flight=")[1])
    assert in_flight >= 1, drained[0]  # at least the held request
    assert any(line.startswith("gpugate stopped") for line in gateway.lines)
    # A clean stop loses no ledger record: every answer of the module is billed.
    db = sqlite3.connect(gateway.state_dir / "gpugate.db")
    try:
        billed = db.execute(
            "SELECT SUM(requests) FROM ledger_allocations WHERE tenant = 'demo'"
        ).fetchone()[0]
    finally:
        db.close()
    assert billed >= answered_earlier + outcomes.count("ok") + 1 > 1
