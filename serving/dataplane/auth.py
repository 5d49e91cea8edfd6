"""The data plane's handshake: both ends prove the cluster secret before any frame.

On connect the replica sends ``MAGIC`` and a fresh 32-byte nonce. The gateway answers
with a nonce of its own and ``HMAC-SHA256(secret, "gateway" | address | both nonces)``;
the replica checks it (constant time) and answers
``HMAC-SHA256(secret, "replica" | address | both nonces)``, which the gateway checks
before it sends a batch, so neither a stranger nor a stand-in replica sees a frame.
Fresh nonces on both sides defeat replay; the distinct labels defeat reflecting one
side's proof back as the other's; the replica's advertised address in both MACs
means a proof made for one replica's port is worthless at another's.

The handshake authenticates the two ends of the connection; it does not encrypt the
frames that follow (the docs say why: docs/operations.md, "Data plane").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

MAGIC = b"gpugate1"  # the handshake's version: a change of the protocol changes it
NONCE = 32
DIGEST = hashlib.sha256().digest_size
HELLO_SIZE = len(MAGIC) + NONCE  # replica -> gateway
ANSWER_SIZE = NONCE + DIGEST  # gateway -> replica: its nonce and its proof
PROOF_SIZE = DIGEST  # replica -> gateway
MIN_SECRET_BYTES = 32
SECRET_FILE = "cluster.secret"  # in the state folder, when nothing else is configured

_GATEWAY = b"gpugate data plane: gateway\x00"
_REPLICA = b"gpugate data plane: replica\x00"


class HandshakeError(ConnectionError):
    """The other end did not prove the cluster secret (or broke the handshake)."""


class ClusterSecret:
    """The key both ends of the data plane hold. Its repr hides it, so it cannot land in
    a log line or a Serve status message by accident; it pickles (Serve hands it to the
    replicas as a constructor argument)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
        self._key = key

    @classmethod
    def from_text(cls, text: str) -> ClusterSecret:
        return cls(text.strip().encode())

    def __repr__(self) -> str:
        return "ClusterSecret(<hidden>)"

    def __reduce__(self) -> tuple[type[ClusterSecret], tuple[bytes]]:
        return ClusterSecret, (self._key,)

    def gateway_proof(self, address: str, replica_nonce: bytes, gateway_nonce: bytes) -> bytes:
        return self._mac(_GATEWAY, address, replica_nonce, gateway_nonce)

    def replica_proof(self, address: str, replica_nonce: bytes, gateway_nonce: bytes) -> bytes:
        return self._mac(_REPLICA, address, replica_nonce, gateway_nonce)

    def _mac(self, label: bytes, address: str, *nonces: bytes) -> bytes:
        message = b"".join((label, address.encode(), b"\x00", *nonces))
        return hmac.new(self._key, message, hashlib.sha256).digest()


def hello() -> tuple[bytes, bytes]:
    """The replica's opening message and the nonce in it."""
    nonce = os.urandom(NONCE)
    return MAGIC + nonce, nonce


def check_answer(
    secret: ClusterSecret, address: str, replica_nonce: bytes, answer: bytes
) -> bytes | None:
    """The replica's proof to send back if ``answer`` proves the secret, else None."""
    if len(answer) != ANSWER_SIZE:
        return None
    gateway_nonce, proof = answer[:NONCE], answer[NONCE:]
    expected = secret.gateway_proof(address, replica_nonce, gateway_nonce)
    if not hmac.compare_digest(proof, expected):
        return None
    return secret.replica_proof(address, replica_nonce, gateway_nonce)


async def prove(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: ClusterSecret,
    address: str,
) -> None:
    """The gateway's side on a fresh connection to ``address`` (as the replica
    advertised it); returns once the replica has proven the secret too."""
    try:
        opening = await reader.readexactly(HELLO_SIZE)
        if opening[: len(MAGIC)] != MAGIC:
            raise HandshakeError(f"{address} does not speak the gpugate data plane")
        replica_nonce = opening[len(MAGIC) :]
        gateway_nonce = os.urandom(NONCE)
        writer.write(gateway_nonce + secret.gateway_proof(address, replica_nonce, gateway_nonce))
        proof = await reader.readexactly(PROOF_SIZE)
    except asyncio.IncompleteReadError:
        raise HandshakeError(
            f"{address} closed the connection during the handshake "
            "(does it hold the same cluster secret?)"
        ) from None
    expected = secret.replica_proof(address, replica_nonce, gateway_nonce)
    if not hmac.compare_digest(proof, expected):
        raise HandshakeError(f"{address} did not prove the cluster secret")


def cluster_secret(
    configured_file: Path | None, state_dir: Path, environ: Mapping[str, str]
) -> ClusterSecret:
    """The secret ``gpugate serve`` hands to the gateway and the replicas:
    ``$GPUGATE_CLUSTER_SECRET``, else ``configured_file``, else the state folder's
    file, made at the first start. ValueError or OSError says why there is none."""
    text = environ.get("GPUGATE_CLUSTER_SECRET")
    if text:
        try:
            return ClusterSecret.from_text(text)
        except ValueError as exc:
            raise ValueError(f"$GPUGATE_CLUSTER_SECRET: {exc}") from None
    if configured_file is not None:
        return read_secret_file(configured_file)
    return ensure_secret_file(state_dir / SECRET_FILE)


def read_secret_file(path: Path) -> ClusterSecret:
    """A secret kept in a file; refused when others than its owner may read it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600")
    try:
        return ClusterSecret.from_text(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def ensure_secret_file(path: Path) -> ClusterSecret:
    """Read ``path``, or create it (mode 0600) with a random secret."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a temporary name, then linked: a second process starting
        # at the same moment reads either no file or the complete one, never a part.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            with contextlib.suppress(FileExistsError):  # another's came first: use theirs
                os.link(tmp, path)
        finally:
            tmp.unlink()
    return read_secret_file(path)
