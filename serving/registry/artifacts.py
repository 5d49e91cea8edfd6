"""Content-addressed artifact storage: ``state_dir/artifacts/sha256/<digest>``, written
while hashing so the recorded digest is of the stored bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

from serving.registry.versions import ArtifactTooLarge, RegistryError, UploadMismatch

_CHUNK = 1 << 20
_INCOMING = ".incoming."
# Longer than an upload's file goes unwritten while its upload is alive: the checks
# after the last byte take at most the smoke test's timeout (600 s or less).
STALE_INCOMING_S = 3600.0


def artifact_path(state_dir: Path, digest: str) -> Path:
    return state_dir / "artifacts" / "sha256" / digest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _store_folder(state_dir: Path) -> Path:
    folder = state_dir / "artifacts" / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _incoming(folder: Path) -> Path:
    return folder / f"{_INCOMING}{os.getpid()}.{os.urandom(4).hex()}"


def sweep_incoming(state_dir: Path, older_than_s: float = STALE_INCOMING_S) -> int:
    """Remove temporary files of uploads that a stopped process left in the store, those
    last written over ``older_than_s`` ago; returns how many."""
    folder = state_dir / "artifacts" / "sha256"
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for path in folder.glob(_INCOMING + "*"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


def _keep(tmp: Path, folder: Path, digest: str) -> None:
    """File a fully written temporary copy under its digest (read-only)."""
    final = folder / digest
    if final.exists():
        tmp.unlink()  # the same bytes are stored already
    else:
        tmp.chmod(0o444)
        os.replace(tmp, final)


def store_artifact(src: Path, state_dir: Path, max_bytes: int) -> tuple[str, int]:
    """Copy ``src`` into the content-addressed store; returns (sha256, size)."""
    if not src.is_file():
        raise RegistryError(f"artifact {src} is not a file")
    size = src.stat().st_size
    if size > max_bytes:
        raise ArtifactTooLarge(f"artifact is {size} bytes; the limit is {max_bytes}")
    folder = _store_folder(state_dir)
    tmp = _incoming(folder)
    h = hashlib.sha256()
    copied = 0
    try:
        with src.open("rb") as fin, tmp.open("xb") as fout:
            while chunk := fin.read(_CHUNK):
                copied += len(chunk)
                if copied > max_bytes:
                    raise ArtifactTooLarge(f"artifact grew past the {max_bytes}-byte limit")
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        digest = h.hexdigest()
        _keep(tmp, folder, digest)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, copied


class ArtifactUpload:
    """An artifact arriving in chunks: written to a temporary file beside the store while
    it is hashed and counted, refused as soon as it passes ``max_bytes``.

    ``finish`` checks the digest the sender declared and makes the file read-only, for
    the guardrails to check; ``store`` then files the bytes under their digest, as
    :func:`store_artifact` does. Leaving the ``with`` block removes whatever was not
    stored.
    """

    def __init__(self, state_dir: Path, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._folder = _store_folder(state_dir)
        self.path = _incoming(self._folder)
        self._file = self.path.open("xb")
        self._hash = hashlib.sha256()
        self._digest: str | None = None

    def __enter__(self) -> ArtifactUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ArtifactTooLarge(f"artifact is over the {self.max_bytes}-byte limit")
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self, declared_sha256: str) -> str:
        """Flush the bytes to disk; their sha256, which must be ``declared_sha256``."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self._hash.hexdigest()
        if digest != declared_sha256.lower():
            raise UploadMismatch(
                f"the {self.size} bytes received hash to sha256 {digest}, not the declared "
                f"{declared_sha256}: the artifact changed in transit or another file was hashed"
            )
        self.path.chmod(0o444)
        self._digest = digest
        return digest

    @property
    def digest(self) -> str:
        """The sha256 of the finished upload."""
        if self._digest is None:
            raise RegistryError("an upload has a digest only after finish() checked it")
        return self._digest

    def store(self) -> tuple[str, int]:
        """File the finished upload under its digest; returns (sha256, size)."""
        _keep(self.path, self._folder, self.digest)
        return self.digest, self.size
