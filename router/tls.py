"""TLS for the front doors: the certificate files, loaded, validated and reloaded.

One :class:`TlsMaterial` serves both ports. The HTTP port gets an ``ssl.SSLContext``
whose SNI callback (which OpenSSL runs on every ClientHello, with or without a server
name) moves each new connection onto the newest context, so a reload never touches a
context that handshakes are using. The grpcio door gets dynamic credentials whose
fetcher gRPC's core asks on every handshake. The native door's gRPC C++ watches files
itself (its file-watcher certificate provider, at the same interval), but it takes a
certificate and key that do not match and then fails every handshake; so it watches
copies this class writes only once they loaded: certificate chain and key in ONE file
(gRPC reads each from the PEM blocks of its kind), renamed into place, so the pair it
reads always matches. The copies live in a private (0700) folder removed by
:meth:`close`.

A reload happens only when the files changed (inode, size or mtime) and only takes
effect when the new set loads: a certificate without its key, or a file caught
half-written, is logged and the previous material stays in use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class TlsFiles:
    """Where the PEM files are (``server.tls`` in the gateway's config)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    reload_interval_s: float = 10.0

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def paths(self) -> list[Path]:
        extra = [self.client_ca_file] if self.client_ca_file is not None else []
        return [self.cert_file, self.key_file, *extra]


class TlsError(RuntimeError):
    """The TLS files cannot be read or do not form a valid certificate and key."""


@dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    cert: bytes
    key: bytes
    client_ca: bytes | None
    generation: int = 0  # 0 at start, +1 per reload


class TlsMaterial:
    """The loaded certificate, key and client CA, and their reloads."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        stamp = self._stamp()
        loaded = self._try_load()
        self._stamp_loaded = stamp
        self._stamp_failed: _Stamp | None = None
        self._current = loaded
        self.reloads = 0  # successful reloads since start (read by tests)
        # The context given to the HTTP server: its SNI callback hands each handshake
        # the current context (itself until the first reload).
        self.http_context = loaded.context
        self.http_context.sni_callback = self._pick_context
        self._grpc_generation = -1
        self._copies: Path | None = None  # the native door's files, once asked for

    # -- loading -------------------------------------------------------------------

    def _stamp(self) -> _Stamp:
        stamps = []
        for path in self.files.paths():
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = self.files.client_ca_file
        return (
            self.files.cert_file.read_bytes(),
            self.files.key_file.read_bytes(),
            ca.read_bytes() if ca is not None else None,
        )

    def _load(self) -> _Loaded | None:
        """:meth:`_try_load`, or None (logged) when the files do not load."""
        try:
            return self._try_load()
        except TlsError as exc:
            log.error("%s; the previous ones stay in use", exc)
            return None

    def _try_load(self) -> _Loaded:
        """The files as a new context plus their bytes; TlsError when they do not load
        or changed while being loaded (a rotation in progress: the next check retries)."""
        names = ", ".join(map(str, self.files.paths()))
        try:
            before = self._read()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.files.cert_file, self.files.key_file)
            if self.files.client_ca_file is not None:
                context.load_verify_locations(cafile=self.files.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
            after = self._read()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TlsError(f"the TLS files {names} do not load: {exc}") from None
        if before != after:
            raise TlsError(f"the TLS files {names} changed while being loaded")
        return _Loaded(context, *after)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since the last load; True when new
        material is in use."""
        stamp = self._stamp()
        if stamp in (self._stamp_loaded, self._stamp_failed):
            return False
        loaded = self._load()
        if loaded is None:
            self._stamp_failed = stamp  # logged once per change, not once per check
            return False
        self._current = dataclasses.replace(loaded, generation=self._current.generation + 1)
        self._write_copies()
        self._stamp_loaded = stamp
        self._stamp_failed = None
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert_file)
        return True

    async def watch(self) -> None:
        """Check the files every ``reload_interval_s`` until cancelled (the owner cancels)."""
        while True:
            await asyncio.sleep(self.files.reload_interval_s)
            self.reload_if_changed()

    # -- the doors -----------------------------------------------------------------

    def native_files(self) -> tuple[Path, Path | None]:
        """The files the native door watches: certificate chain plus key in one file,
        and the client CA (None without mutual TLS)."""
        if self._copies is None:
            self._copies = Path(tempfile.mkdtemp(prefix="gpugate-tls-"))  # mode 0700
            self._write_copies()
        ca = self._copies / "client-ca.pem" if self.files.mutual else None
        return self._copies / "identity.pem", ca

    def _write_copies(self) -> None:
        if self._copies is None:
            return
        loaded = self._current
        identity = loaded.cert.rstrip(b"\n") + b"\n" + loaded.key
        _replace(self._copies / "identity.pem", identity)
        if loaded.client_ca is not None:
            _replace(self._copies / "client-ca.pem", loaded.client_ca)

    def close(self) -> None:
        """Remove the native door's copies (after the door stopped)."""
        if self._copies is not None:
            shutil.rmtree(self._copies, ignore_errors=True)
            self._copies = None

    def _pick_context(self, conn: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self._current.context
        if current is not context:
            conn.context = current

    def grpcio_credentials(self) -> grpc.ServerCredentials:
        """Credentials for grpc.aio's ``add_secure_port`` that follow the reloads."""
        mutual = self.files.mutual
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_configuration(),
            self._grpc_fetch,
            require_client_authentication=mutual,
        )

    def _grpc_configuration(self) -> Any:
        loaded = self._current
        self._grpc_generation = loaded.generation
        return grpc.ssl_server_certificate_configuration(
            [(loaded.key, loaded.cert)], root_certificates=loaded.client_ca
        )

    def _grpc_fetch(self) -> Any:
        # Called by gRPC's core on each handshake; None keeps the configuration it has.
        if self._current.generation == self._grpc_generation:
            return None
        return self._grpc_configuration()


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` in one step: readers see the old file or the new one, never a part."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(partial, path)
