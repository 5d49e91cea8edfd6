"""Certificates made at test time (nothing is committed): a CA, server certificates for
127.0.0.1/localhost, and client certificates, as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Authority:
    """A CA that signs server and client certificates into ``folder``."""

    folder: Path
    name: str = "gpugate test CA"

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = self.folder / f"{self.name.replace(' ', '-')}.pem"
        self.cert_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @property
    def pem(self) -> bytes:
        return self.cert_file.read_bytes()

    def issue(self, stem: str, *, server: bool) -> tuple[Path, Path, int]:
        """A certificate and key as ``stem``.pem / ``stem``.key; returns their paths and
        the certificate's serial number. A server certificate names 127.0.0.1 and
        localhost; a client certificate is for client authentication."""
        key = _key()
        serial = x509.random_serial_number()
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_file, key_file = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        _replace(key_file, _pem_key(key), mode=0o600)
        _replace(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, key_file, serial


def _replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` whole in one step (rename), as a careful rotation does."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.chmod(partial, mode)
    os.replace(partial, path)


def rotate(target_cert: Path, target_key: Path, new_cert: Path, new_key: Path) -> None:
    """Put a new certificate and key in place of the served ones (key first, each renamed
    over the old file)."""
    _replace(target_key, new_key.read_bytes(), mode=0o600)
    _replace(target_cert, new_cert.read_bytes())


def served_serial(
    host: str,
    port: int,
    ca_file: Path,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    alpn: str | None = None,
) -> int:
    """The serial number of the certificate a new TLS connection to ``host:port`` gets
    (presenting ``client_cert`` when given)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client_cert is not None:
        context.load_cert_chain(client_cert, client_key)
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)
