"""Content-addressed artifact storage: ``state_dir/artifacts/sha256/<digest>``, written
while hashing so the recorded digest is of the stored bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

from serving.registry.versions import GuardrailRefused, RegistryError

_CHUNK = 1 << 20


def artifact_path(state_dir: Path, digest: str) -> Path:
    return state_dir / "artifacts" / "sha256" / digest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def store_artifact(src: Path, state_dir: Path, max_bytes: int) -> tuple[str, int]:
    """Copy ``src`` into the content-addressed store; returns (sha256, size)."""
    if not src.is_file():
        raise RegistryError(f"artifact {src} is not a file")
    size = src.stat().st_size
    if size > max_bytes:
        raise GuardrailRefused("size", f"artifact is {size} bytes; the limit is {max_bytes}")
    folder = state_dir / "artifacts" / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".incoming.{os.getpid()}.{os.urandom(4).hex()}"
    h = hashlib.sha256()
    copied = 0
    try:
        with src.open("rb") as fin, tmp.open("xb") as fout:
            while chunk := fin.read(_CHUNK):
                copied += len(chunk)
                if copied > max_bytes:
                    raise GuardrailRefused("size", f"artifact grew past the {max_bytes}-byte limit")
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        digest = h.hexdigest()
        final = folder / digest
        if final.exists():
            tmp.unlink()  # the same bytes are stored already
        else:
            tmp.chmod(0o444)
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, copied


def git_revision(where: Path) -> str | None:
    """The git commit of the folder the model came from, if it is in a repository."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip() or None
    return None
