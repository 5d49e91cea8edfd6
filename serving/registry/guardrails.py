"""The registry's guardrails: each refuses a version with a reason, or returns None.

* format allowlist and pickle payloads (a pickle anywhere the format does not
  need one, or referencing anything but tensor types);
* digest: the stored bytes must still hash to the registered sha256 (checked
  at every stage change here, and by every replica before it loads);
* signature compatibility with production;
* metrics no worse than production beyond the model's policy;
* a smoke test that loads the candidate in a separate, restricted process and runs
  inputs generated from its signature, refusing errors and NaN/Inf;
* size (enforced while the upload arrives, serving.registry.artifacts).

Every check reads only a bounded part of an artifact into memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickletools
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

from serving.config import MetricPolicy, ModelConfig, ModelPolicy, TensorConfig
from serving.registry.artifacts import file_digest
from serving.registry.versions import GuardrailRefused, Signature
from serving.replica import (
    FORMATS,
    MAX_PICKLE_BYTES,
    ModelLoadError,
    open_archive,
    read_record,
    vet_pt2,
)

_PICKLE_OPCODE_PROTO = 0x80
# How much of a file starting like a pickle is read to tell whether it is one.
_PICKLE_SCAN_BYTES = 2**20
# TorchScript's own pickles name only TorchScript classes and torch's rebuild helpers.
_TORCHSCRIPT_MODULES = ("__torch__", "torch", "collections")


def check_format(artifact: Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise GuardrailRefused("format", f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not artifact.is_file():
        raise GuardrailRefused("format", f"artifact {artifact} is not a file")


def check_payload(artifact: Path, fmt: str) -> None:
    """Refuse pickle payloads: the only code that may run is TorchScript or our classes."""
    with artifact.open("rb") as f:
        head = f.read(16)
    if head[:1] == bytes([_PICKLE_OPCODE_PROTO]) and _is_pickle(artifact):
        raise GuardrailRefused("payload", "the artifact is a Python pickle")
    if fmt == "safetensors":
        _check_safetensors(artifact, head)
    elif fmt == "torchscript":
        _check_torchscript(artifact)
    else:
        try:
            vet_pt2(artifact)
        except ModelLoadError as exc:
            raise GuardrailRefused("payload", exc.reason) from None


class _PastBound(Exception):
    """Raised by :class:`_Bounded` instead of reading past its bound."""


class _Bounded:
    """The start of a file, for ``pickletools.genops``: reads that would go past ``bound``
    bytes raise :class:`_PastBound` instead of reading (a pickle's opcode can announce
    an argument of any length)."""

    def __init__(self, f: BinaryIO, bound: int) -> None:
        self._f = f
        self._left = bound

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            raise _PastBound
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._f.readline(self._left + 1)
        if len(line) > self._left:
            raise _PastBound
        self._left -= len(line)
        return line

    def tell(self) -> int:
        return self._f.tell()


def _is_pickle(path: Path) -> bool:
    """Whether the file's first :data:`_PICKLE_SCAN_BYTES` are pickle opcodes, up to a
    STOP or to that bound: a file that reads as a pickle that far is one."""
    with path.open("rb") as f:
        try:
            # genops needs only read, readline and tell.
            for _ in pickletools.genops(cast(IO[bytes], _Bounded(f, _PICKLE_SCAN_BYTES))):
                pass
        except _PastBound:
            return True
        except Exception:
            return False
    return True


def _check_safetensors(artifact: Path, head: bytes) -> None:
    if zipfile.is_zipfile(artifact):
        raise GuardrailRefused(
            "payload", "a zip archive, not safetensors (torch.save files hold pickles)"
        )
    size = artifact.stat().st_size
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not 2 <= header_len <= min(size - 8, 100 * 2**20) or head[8:9] != b"{":
        raise GuardrailRefused("payload", "not a safetensors file (no JSON header)")
    with artifact.open("rb") as f:
        f.seek(8)
        try:
            json.loads(f.read(header_len))
        except (ValueError, RecursionError):  # nesting too deep for the parser: not a header
            raise GuardrailRefused("payload", "not a safetensors file (bad header)") from None


def _check_torchscript(artifact: Path) -> None:
    if not zipfile.is_zipfile(artifact):
        raise GuardrailRefused("payload", "not a TorchScript archive (torch.jit.save writes a zip)")
    try:
        with open_archive(artifact) as zf:
            names = zf.namelist()
            if not any("/code/" in n for n in names):
                # torch.save writes the same zip layout without code: a pickled object.
                raise GuardrailRefused(
                    "payload", "a torch.save pickle archive, not TorchScript (no code/ folder)"
                )
            for name in names:
                if name.endswith(".pkl"):
                    _check_pickle_globals(read_record(artifact, zf, name, MAX_PICKLE_BYTES), name)
    except ModelLoadError as exc:
        raise GuardrailRefused("payload", exc.reason) from None


def _check_pickle_globals(data: bytes, what: str) -> None:
    # The last two strings pushed: STACK_GLOBAL's module and name. Opcode by opcode,
    # never as a list: a small pickle can hold millions of opcodes.
    strings: tuple[str, str] | None = None
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                module = str(arg).split(" ")[0]
                if not module.startswith(_TORCHSCRIPT_MODULES):
                    raise GuardrailRefused("payload", f"{what} references {arg!r}")
            elif (
                opcode.name == "STACK_GLOBAL"
                and strings is not None
                and not strings[0].startswith(_TORCHSCRIPT_MODULES)
            ):
                raise GuardrailRefused("payload", f"{what} references {strings[0]}.{strings[1]}")
            if isinstance(arg, str):
                strings = (strings[1] if strings is not None else "", arg)
    except GuardrailRefused:
        raise
    except Exception as exc:
        raise GuardrailRefused("payload", f"{what}: malformed pickle: {exc}") from None


def check_digest(artifact: Path, digest: str) -> None:
    if not artifact.is_file():
        raise GuardrailRefused("digest", f"the stored artifact {artifact} is missing")
    actual = file_digest(artifact)
    if actual != digest:
        raise GuardrailRefused(
            "digest",
            f"the stored artifact's sha256 is {actual}, not the registered {digest}: its "
            "bytes changed after registration",
        )


def _dims_compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def check_signature(candidate: Signature, production: Signature) -> None:
    """Clients of production must work unchanged: same inputs, outputs still there."""
    problems: list[str] = []
    want = {t.name: t for t in production.inputs}
    have = {t.name: t for t in candidate.inputs}
    if set(want) != set(have):
        problems.append(f"inputs {sorted(have)} differ from production's {sorted(want)}")
    problems += _tensor_diffs("input", want, have)
    want_out = {t.name: t for t in production.outputs}
    have_out = {t.name: t for t in candidate.outputs}
    missing = sorted(set(want_out) - set(have_out))
    if missing:
        problems.append(f"outputs {missing} of production are missing")
    problems += _tensor_diffs("output", want_out, have_out)
    if problems:
        raise GuardrailRefused(
            "signature",
            "incompatible with the production version: "
            + "; ".join(problems)
            + " (register it under a new model name instead)",
        )


def _tensor_diffs(
    kind: str, want: Mapping[str, TensorConfig], have: Mapping[str, TensorConfig]
) -> list[str]:
    out = []
    for name in sorted(set(want) & set(have)):
        w, h = want[name], have[name]
        if w.datatype != h.datatype:
            out.append(f"{kind} {name!r} is {h.datatype}, production's is {w.datatype}")
        elif not _dims_compatible(w.shape, h.shape):
            out.append(f"{kind} {name!r} has shape {h.shape}, production's is {w.shape}")
    return out


def regression(new: float, old: float, rule: MetricPolicy) -> float:
    """How much worse ``new`` is than production's ``old`` (negative: better)."""
    return (old - new) if rule.higher_is_better else (new - old)


def within_policy(new: float, old: float, rule: MetricPolicy) -> bool:
    """Whether the metrics guardrail lets ``new`` through against production's ``old``."""
    return math.isfinite(new) and regression(new, old, rule) <= rule.max_regression + 1e-12


def check_metrics(
    candidate: Mapping[str, float], production: Mapping[str, float], policy: ModelPolicy
) -> None:
    for metric, rule in sorted(policy.metrics.items()):
        if metric not in production:
            continue  # nothing to compare against
        if metric not in candidate:
            raise GuardrailRefused(
                "metrics", f"no {metric!r} metric; production has {production[metric]:g}"
            )
        new, old = float(candidate[metric]), float(production[metric])
        worse = regression(new, old, rule)
        if not within_policy(new, old, rule):
            raise GuardrailRefused(
                "metrics",
                f"{metric} {new:g} is worse than production's {old:g} by {worse:g}; the "
                f"policy allows at most {rule.max_regression:g}",
            )


@dataclass(frozen=True)
class SmokeLimits:
    """What the smoke test's process may use. Its address space is ``memory_bytes`` plus
    three times the artifact's size (the weights are read, the module is built, and the
    weights are copied in); its CPU time is the policy's ``smoke_timeout_s``."""

    memory_bytes: int = 4 * 2**30
    open_files: int = 64
    file_bytes: int = 64 * 2**20

    def for_artifact(self, artifact: Path, timeout_s: float) -> dict[str, int]:
        """The limits the child applies to itself (serving.replica.smoke)."""
        return {
            "memory_bytes": self.memory_bytes + 3 * artifact.stat().st_size,
            "cpu_s": math.ceil(timeout_s),
            "open_files": self.open_files,
            "file_bytes": self.file_bytes,
        }


def smoke_test(config: ModelConfig, policy: ModelPolicy, limits: SmokeLimits) -> None:
    """Load and run the candidate in a child process, so a crash, a hang or a model that
    imports badly cannot take the caller down.

    The candidate's code (its ``model_class``, TorchScript or export program) runs there
    before anyone approved it, so the child gets as little as this process can withhold
    without another user: an environment of PATH, locale, one thread and no GPU (none of
    the gateway's variables: no database URL, keys, tokens or telemetry settings), a fresh
    temporary folder as its home and working directory, removed afterwards, no stdin and
    no inherited descriptors, resource limits (``limits``; the child sets them on itself
    before it loads the candidate) and a session and process group of its own; the group
    is killed when the child ends or the policy's ``smoke_timeout_s`` passes.
    """
    artifact = config.artifact.resolve()
    request = {
        "config": config.model_copy(update={"artifact": artifact}).model_dump(mode="json"),
        "rows": policy.smoke_rows,
        "limits": limits.for_artifact(artifact, policy.smoke_timeout_s),
    }
    with tempfile.TemporaryDirectory(prefix="gpugate-smoke-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        (work / "request.json").write_text(json.dumps(request))
        out, err = work / "stdout", work / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", "serving.replica.smoke", str(work / "request.json")],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=work,
                env=_child_env(work),
                close_fds=True,
                start_new_session=True,
            )
        in_time = _wait_then_kill_group(child, policy.smoke_timeout_s)
        if not in_time:
            raise GuardrailRefused(
                "smoke-test", f"did not load and run within {policy.smoke_timeout_s:g}s"
            )
        lines = _tail(out).strip().splitlines()
        problem = _tail(err).strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if not isinstance(result, dict):
        result = {}
    if child.returncode != 0 or result.get("ok") is not True:
        reason = result.get("reason") or (problem[-1] if problem else "")
        if child.returncode < 0:
            name = signal.Signals(-child.returncode).name
            reason = f"killed by {name}{_SIGNAL_CAUSES.get(name, '')}" + (
                f": {reason}" if reason else ""
            )
        raise GuardrailRefused("smoke-test", str(reason or "crashed")[:2000])


# What a resource limit's signal means in a refusal.
_SIGNAL_CAUSES = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (CPU time or memory limit)"}
_TAIL_BYTES = 64 * 1024
_POLL_S = 0.05
_EXITED_UNREAPED = os.WEXITED | os.WNOHANG | os.WNOWAIT


def _child_env(work: Path) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        # CPU only: the candidate gets no GPU before approval, and CUDA's address-space
        # reservations would not fit the memory limit.
        "CUDA_VISIBLE_DEVICES": "",
    }
    path = _import_path()
    if path:
        env["PYTHONPATH"] = path
    return env


def _import_path() -> str:
    """The PYTHONPATH that lets the child import what this process imports: this
    process's own (made absolute, as the child runs elsewhere), and the folder holding
    gpugate's packages when it is on this process's path rather than installed."""
    entries = [
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    root = Path(__file__).resolve().parents[2]  # the folder holding serving/
    on_path = {Path(p or ".").resolve() for p in sys.path}
    if root in on_path and str(root) not in entries:
        entries.append(str(root))
    return os.pathsep.join(entries)


def _wait_then_kill_group(child: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``child`` to exit, then kill its process group (it and
    whatever it started there) and reap it; whether it exited in time.

    The child is reaped only after the kill: until then its process ID, which is its
    process group's ID, cannot be reused by an unrelated process.
    """
    deadline = time.monotonic() + timeout_s
    exited = False
    while not exited and time.monotonic() < deadline:
        try:
            exited = os.waitid(os.P_PID, child.pid, _EXITED_UNREAPED) is not None
        except ChildProcessError:  # reaped elsewhere
            exited = True
        if not exited:
            time.sleep(_POLL_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    return exited


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        return f.read().decode("utf-8", "replace")
