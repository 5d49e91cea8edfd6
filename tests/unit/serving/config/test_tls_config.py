"""``server.tls`` and the gRPC bounds in the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.tls import TlsFiles
from serving.config import ConfigError, load_config


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "gpugate.yaml"
    path.write_text(text)
    return load_config(path)


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        "server:\n  tls:\n    cert_file: tls/a.pem\n    key_file: /etc/k.key\n"
        "    client_ca_file: ca.pem\n    reload_interval_s: 2\n",
    )
    tls = config.server.tls  # type: ignore[attr-defined]
    assert tls.files() == TlsFiles(
        tmp_path.resolve() / "tls/a.pem", Path("/etc/k.key"), tmp_path.resolve() / "ca.pem", 2
    )


def test_tls_is_off_and_grpc_bounds_are_finite_by_default(tmp_path: Path) -> None:
    server = _load(tmp_path, "{}\n").server  # type: ignore[attr-defined]
    assert server.tls is None
    assert server.grpc_max_concurrent_streams == 1024
    assert server.grpc_max_concurrent_calls == 4096


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("server:\n  tls:\n    cert_file: a.pem\n", "server.tls.key_file"),
        ("server:\n  tls: {cert_file: a, key_file: b, ca: c}\n", "server.tls.ca: unknown key"),
        ("server:\n  tls: {cert_file: a, key_file: b, reload_interval_s: 0}\n", "reload"),
        ("server:\n  grpc_max_concurrent_streams: 0\n", "grpc_max_concurrent_streams"),
        ("server:\n  grpc_max_concurrent_calls: 0\n", "grpc_max_concurrent_calls"),
    ],
)
def test_bad_tls_and_bounds_are_refused_naming_the_key(
    tmp_path: Path, text: str, where: str
) -> None:
    with pytest.raises(ConfigError, match=where):
        _load(tmp_path, text)
