"""TLS on both ports (``server.tls``), on each gRPC door, with the unchanged tritonclient.

Certificates are made per test run (tests/tls_certs.py). What is checked: tritonclient
over TLS gets correct answers on HTTP and gRPC; plain-text clients get nothing; with a
client CA, a client without a certificate (or with one from another CA) is refused on
both ports; a rotated certificate is what new connections get, within the reload
interval, and a rotation caught half-way (a certificate without its key) leaves the old
one serving.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings
from router.tls import TlsError, TlsFiles
from scheduler import BatchPolicy
from tests.fakes import StaticModelTable
from tests.integration.router.helpers import (
    AFFINE_SIGNATURE,
    DOORS,
    HOST,
    AffineBackend,
    Directory,
    LoopThread,
    ModelSpec,
    Stack,
    TritonHttp,
    assert_affine,
    grpc_infer,
    http_infer,
    sample,
    start_stack,
    stop_stack,
)
from tests.integration.router.native_door import require_native_door
from tests.tls_certs import Authority, rotate, served_serial

pytestmark = [pytest.mark.timeout(120)]

RELOAD_S = 1


def _models() -> list[ModelSpec]:
    policy = BatchPolicy(max_batch_size=64)
    return [("affine", "2", AFFINE_SIGNATURE, AffineBackend(2), policy)]


class Pki:
    """A CA, the server's certificate files (as the config names them) and a client's."""

    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        cert, key, self.serial = self.ca.issue("issued-1", server=True)
        self.cert_file, self.key_file = folder / "server.pem", folder / "server.key"
        rotate(self.cert_file, self.key_file, cert, key)
        self.client_cert, self.client_key, _ = self.ca.issue("client", server=False)
        self.stranger = Authority(folder / "stranger", name="stranger CA")
        self.stranger_cert, self.stranger_key, _ = self.stranger.issue("intruder", server=False)

    def files(self, mutual: bool) -> TlsFiles:
        return TlsFiles(
            self.cert_file,
            self.key_file,
            self.ca.cert_file if mutual else None,
            reload_interval_s=RELOAD_S,
        )


def _start(loop_thread: LoopThread, door: str, tls: TlsFiles) -> Stack:
    if door == "native":
        require_native_door()
    stack: Stack = loop_thread.run(start_stack(_models(), door, tls=tls))
    return stack


@pytest.fixture(params=DOORS)
def door(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def tls_stack(loop_thread: LoopThread, door: str, pki: Pki) -> Iterator[Stack]:
    stack = _start(loop_thread, door, pki.files(mutual=False))
    yield stack
    loop_thread.run(stop_stack(stack))


@pytest.fixture
def mtls_stack(loop_thread: LoopThread, door: str, pki: Pki) -> Iterator[Stack]:
    stack = _start(loop_thread, door, pki.files(mutual=True))
    yield stack
    loop_thread.run(stop_stack(stack))


def _grpc(stack: Stack, pki: Pki, cert: Path | None = None, key: Path | None = None) -> Any:
    return grpcclient.InferenceServerClient(
        stack.grpc_url,
        ssl=True,
        root_certificates=str(pki.ca.cert_file),
        private_key=str(key) if key else None,
        certificate_chain=str(cert) if cert else None,
    )


def _http(stack: Stack, pki: Pki, cert: Path | None = None, key: Path | None = None) -> Any:
    options = {"ca_certs": str(pki.ca.cert_file)}
    if cert is not None and key is not None:
        options |= {"certfile": str(cert), "keyfile": str(key)}
    return TritonHttp(stack.http_url, ssl=True, ssl_options=options, network_timeout=30.0)


def _both_answer(stack: Stack, pki: Pki, seed: int, **client: Path) -> None:
    x, k = sample(3, seed=seed)
    gc = _grpc(stack, pki, **client)
    try:
        assert_affine(grpc_infer(gc, x, k), x, k)
    finally:
        gc.close()
    hc = _http(stack, pki, **client)
    try:
        assert_affine(http_infer(hc, x, k), x, k)
    finally:
        hc.close()


def _grpc_refused(stack: Stack, pki: Pki, **client: Path) -> None:
    x, k = sample(1, seed=3)
    gc = _grpc(stack, pki, **client)
    try:
        with pytest.raises(InferenceServerException) as refused:
            grpc_infer(gc, x, k, client_timeout=10)
    finally:
        gc.close()
    assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value


def _http_refused(
    stack: Stack, pki: Pki, cert: Path | None = None, key: Path | None = None
) -> None:
    cert_arg = (str(cert), str(key)) if cert is not None and key is not None else None
    verify = httpx.create_ssl_context(verify=str(pki.ca.cert_file), cert=cert_arg)
    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"https://{stack.http_url}/v2/models/affine/infer",
            json={},
            headers={"Authorization": "Bearer key-alice"},
            verify=verify,
            timeout=10,
        )


def test_tritonclient_over_tls_on_both_ports(tls_stack: Stack, pki: Pki) -> None:
    _both_answer(tls_stack, pki, seed=1)


def test_plain_text_clients_are_refused(tls_stack: Stack) -> None:
    x, k = sample(1, seed=2)
    plain = grpcclient.InferenceServerClient(tls_stack.grpc_url)  # no ssl
    try:
        with pytest.raises(InferenceServerException) as refused:
            grpc_infer(plain, x, k, client_timeout=10)
    finally:
        plain.close()
    assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
    # The HTTP port answers nothing in plain text: no status line, no JSON.
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://{tls_stack.http_url}/v2/models/affine/infer", json={}, timeout=10)


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_stack: Stack, pki: Pki) -> None:
    _both_answer(mtls_stack, pki, seed=4, cert=pki.client_cert, key=pki.client_key)
    _grpc_refused(mtls_stack, pki)
    _http_refused(mtls_stack, pki)
    _grpc_refused(mtls_stack, pki, cert=pki.stranger_cert, key=pki.stranger_key)
    _http_refused(mtls_stack, pki, cert=pki.stranger_cert, key=pki.stranger_key)
    # Refusals leave the ports serving.
    _both_answer(mtls_stack, pki, seed=5, cert=pki.client_cert, key=pki.client_key)


def _serials(stack: Stack, pki: Pki) -> tuple[int, int]:
    return (
        served_serial(HOST, stack.doors.http_port, pki.ca.cert_file),
        served_serial(HOST, stack.doors.grpc_port, pki.ca.cert_file, alpn="h2"),
    )


def _wait_for_serials(stack: Stack, pki: Pki, serial: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (seen := _serials(stack, pki)) != (serial, serial):
        assert time.monotonic() < deadline, f"served serials {seen}, expected {serial}"
        time.sleep(0.2)


def test_a_rotated_certificate_reaches_new_connections(tls_stack: Stack, pki: Pki) -> None:
    assert _serials(tls_stack, pki) == (pki.serial, pki.serial)
    # A connection opened before the rotation keeps working after it.
    gc = _grpc(tls_stack, pki)
    try:
        x, k = sample(2, seed=6)
        assert_affine(grpc_infer(gc, x, k), x, k)
        cert, key, serial = pki.ca.issue("issued-2", server=True)
        rotate(pki.cert_file, pki.key_file, cert, key)
        _wait_for_serials(tls_stack, pki, serial)
        assert_affine(grpc_infer(gc, x, k), x, k)
    finally:
        gc.close()
    _both_answer(tls_stack, pki, seed=7)


def test_a_certificate_without_its_key_leaves_the_old_one_serving(
    tls_stack: Stack, pki: Pki
) -> None:
    cert, key, serial = pki.ca.issue("issued-3", server=True)
    # Only the certificate is replaced: it does not match the key in place.
    pki.cert_file.write_bytes(cert.read_bytes())
    time.sleep(3 * RELOAD_S + 0.5)
    assert _serials(tls_stack, pki) == (pki.serial, pki.serial)
    _both_answer(tls_stack, pki, seed=8)
    # The key follows: the pair loads.
    rotate(pki.cert_file, pki.key_file, cert, key)
    _wait_for_serials(tls_stack, pki, serial)
    _both_answer(tls_stack, pki, seed=9)


def test_files_that_do_not_load_stop_the_start(pki: Pki) -> None:
    service = InferenceService(StaticModelTable([]), Directory(), RouterSettings())
    other_cert, _, _ = pki.ca.issue("unmatched", server=True)
    bad = TlsFiles(other_cert, pki.key_file)  # a certificate with another's key
    with pytest.raises(TlsError, match=r"unmatched\.pem.* do not load: .*KEY_VALUES_MISMATCH"):
        FrontDoors(service, HOST, 1 << 20, grpc_server="grpcio", tls=bad)
    missing = TlsFiles(pki.cert_file, pki.key_file.with_name("absent.key"))
    with pytest.raises(TlsError, match=r"absent\.key"):
        FrontDoors(service, HOST, 1 << 20, grpc_server="grpcio", tls=missing)
