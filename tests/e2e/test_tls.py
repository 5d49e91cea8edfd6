"""`gpugate serve` with ``server.tls`` and a client CA (mutual TLS), driven by the unchanged
tritonclient over both protocols.

One gateway (local Ray, the demo digits model) serves the module; its certificates are
made at test time (tests/tls_certs.py) and named in its config by paths relative to the
config file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Gateway, configured_gateway
from tests.tls_certs import Authority, rotate, served_serial

pytestmark = pytest.mark.timeout(300)

X, Y = load_digits(return_X_y=True)
X = X.astype(np.float32)


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = Authority(folder / "ca")
        cert, key, self.serial = self.ca.issue("server-1", server=True)
        self.cert_file, self.key_file = folder / "server.pem", folder / "server.key"
        rotate(self.cert_file, self.key_file, cert, key)
        self.client_cert, self.client_key, _ = self.ca.issue("client", server=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    # configured_gateway writes the config next to the state folder; the TLS paths in it
    # are relative to that file's folder.
    base = tmp_path_factory.getbasetemp()
    config = f"""
server:
  tls:
    cert_file: {pki.cert_file.relative_to(base)}
    key_file: {pki.key_file.relative_to(base)}
    client_ca_file: {pki.ca.cert_file.relative_to(base)}
    reload_interval_s: 1
"""
    with configured_gateway(tmp_path_factory, "tls-state", config) as gw:
        assert gw.config is not None and gw.config.parent == base
        yield gw


def _grpc_client(gw: Gateway, pki: Pki, with_cert: bool = True) -> Any:
    return tgrpc.InferenceServerClient(
        gw.grpc_url,
        ssl=True,
        root_certificates=str(pki.ca.cert_file),
        private_key=str(pki.client_key) if with_cert else None,
        certificate_chain=str(pki.client_cert) if with_cert else None,
    )


def _http_client(gw: Gateway, pki: Pki) -> Any:
    options = {
        "ca_certs": str(pki.ca.cert_file),
        "certfile": str(pki.client_cert),
        "keyfile": str(pki.client_key),
    }
    return thttp.InferenceServerClient(gw.http_url, ssl=True, ssl_options=options)


def _logits_grpc(client: Any, gw: Gateway, x: np.ndarray) -> np.ndarray:
    inp = tgrpc.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], headers={"authorization": f"Bearer {gw.demo_key}"})
    return np.asarray(result.as_numpy("logits"))


def _logits_http(client: Any, gw: Gateway, x: np.ndarray) -> np.ndarray:
    inp = thttp.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = thttp.InferRequestedOutput("logits", binary_data=True)
    headers = {"Authorization": f"Bearer {gw.demo_key}"}
    result = client.infer("digits", [inp], outputs=[out], headers=headers)
    return np.asarray(result.as_numpy("logits"))


def _both(gw: Gateway, pki: Pki, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gc, hc = _grpc_client(gw, pki), _http_client(gw, pki)
    try:
        return _logits_grpc(gc, gw, x), _logits_http(hc, gw, x)
    finally:
        gc.close()
        hc.close()


def test_tritonclient_classifies_digits_over_tls_on_both_protocols(
    gateway: Gateway, pki: Pki
) -> None:
    x = X[:64]
    over_grpc, over_http = _both(gateway, pki, x)
    np.testing.assert_allclose(over_grpc, over_http, rtol=1e-5, atol=1e-5)
    assert float((over_grpc.argmax(1) == Y[:64]).mean()) >= 0.9


def test_plain_text_and_certificate_less_clients_are_refused(gateway: Gateway, pki: Pki) -> None:
    x = X[:2]
    for client in (
        tgrpc.InferenceServerClient(gateway.grpc_url),  # plain text
        _grpc_client(gateway, pki, with_cert=False),  # TLS, no client certificate
    ):
        try:
            with pytest.raises(InferenceServerException) as refused:
                _logits_grpc(client, gateway, x)
        finally:
            client.close()
        assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
    headers = {"Authorization": f"Bearer {gateway.demo_key}"}
    url = f"{gateway.http_url}/v2/models/digits/infer"
    with pytest.raises(httpx.TransportError):  # plain text: no HTTP answer at all
        httpx.post(f"http://{url}", json={}, headers=headers, timeout=10)
    without_cert = httpx.create_ssl_context(verify=str(pki.ca.cert_file))
    with pytest.raises(httpx.TransportError):
        httpx.post(f"https://{url}", json={}, headers=headers, verify=without_cert, timeout=10)
    # The refusals leave both ports serving.
    over_grpc, over_http = _both(gateway, pki, x)
    np.testing.assert_allclose(over_grpc, over_http, rtol=1e-5, atol=1e-5)


def test_a_rotated_certificate_is_served_to_new_connections(gateway: Gateway, pki: Pki) -> None:
    def serials() -> tuple[int, int]:
        context_files = (pki.ca.cert_file, pki.client_cert, pki.client_key)
        return (
            served_serial("127.0.0.1", gateway.http_port, *context_files),
            served_serial("127.0.0.1", gateway.grpc_port, *context_files, alpn="h2"),
        )

    assert serials() == (pki.serial, pki.serial)
    cert, key, serial = pki.ca.issue("server-2", server=True)
    rotate(pki.cert_file, pki.key_file, cert, key)
    deadline = time.monotonic() + 20
    while (seen := serials()) != (serial, serial):
        assert time.monotonic() < deadline, f"still served {seen} after the rotation to {serial}"
        time.sleep(0.25)
    over_grpc, over_http = _both(gateway, pki, X[:8])
    np.testing.assert_allclose(over_grpc, over_http, rtol=1e-5, atol=1e-5)
