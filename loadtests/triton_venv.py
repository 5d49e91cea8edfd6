"""The Triton peer's own virtual environment, built on demand.

PyTriton 0.7.0 needs numpy<2 while gpugate's environment has numpy 2, so the
Triton peer runs under a separate venv made from the *same* base interpreter
(its libpython is the one Triton's Python-backend stub must load). It is never
part of the test suite's install: ``bench.py`` builds it when Triton is asked
for and it is missing (``--quick`` skips Triton instead), or ``make
triton-venv`` / ``python loadtests/triton_venv.py`` builds it ahead of time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".venv-triton"
# torch first and alone, pinned as in the Makefile: any other spec pulls a CUDA build.
TORCH = "torch==2.13.0"
REQUIREMENTS = (
    "nvidia-pytriton==0.7.0",
    "numpy<2",
    "pydantic>=2.7",
    "pyyaml>=6",
    "safetensors>=0.4",
)
STAMP = ".gpugate-triton-venv"


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _stamp_text() -> str:
    return "\n".join((sys.version.split()[0], TORCH, *REQUIREMENTS)) + "\n"


def is_built(venv: Path) -> bool:
    stamp = venv / STAMP
    return python(venv).is_file() and stamp.is_file() and stamp.read_text() == _stamp_text()


def base_python() -> str:
    """The interpreter this venv (if any) was made from, so both share one libpython."""
    return getattr(sys, "_base_executable", None) or sys.executable


def libpython_dir() -> str:
    """Directory of the running interpreter's shared libpython (LD_LIBRARY_PATH entry)."""
    return str(sysconfig.get_config_var("LIBDIR") or Path(base_python()).resolve().parent)


def build(venv: Path, log: Callable[[str], None]) -> None:
    """(Re)create ``venv`` with PyTriton and what ``serving.replica`` needs; a few minutes."""
    log(f"building the Triton venv {venv} (PyTriton needs numpy<2; a few minutes)")

    def run(*argv: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"building {venv} failed: {' '.join(argv)}\n{done.stdout[-3000:]}"
                f"\n{done.stderr[-3000:]}"
            )

    run(base_python(), "-m", "venv", "--clear", str(venv))
    pip = [str(python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run(*pip, TORCH)
    run(*pip, *REQUIREMENTS)
    (venv / STAMP).write_text(_stamp_text())
    log(f"Triton venv ready: {venv}")


def ensure(venv: Path, log: Callable[[str], None]) -> Path:
    if not is_built(venv):
        build(venv, log)
    return python(venv)


def environment() -> dict[str, str]:
    """What the Triton peer's process needs on top of the benchmark's environment."""
    ld = [libpython_dir(), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    return {"LD_LIBRARY_PATH": ":".join(ld), "PYTHONPATH": str(REPO)}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_VENV
    ensure(target, lambda m: print(m, file=sys.stderr, flush=True))
