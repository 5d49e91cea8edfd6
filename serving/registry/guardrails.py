"""The registry's guardrails: each refuses a version with a reason, or returns None.

* format allowlist and pickle payloads (a pickle anywhere the format does not
  need one, or referencing anything but tensor types);
* digest: the stored bytes must still hash to the registered sha256 (checked
  at every stage change here, and by every replica before it loads);
* signature compatibility with production;
* metrics no worse than production beyond the model's policy;
* a smoke test that loads the candidate in a separate process and runs inputs
  generated from its signature, refusing errors and NaN/Inf;
* size (enforced while copying into the store, serving.registry.store).
"""

from __future__ import annotations

import json
import math
import os
import pickletools
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

from serving.config import ModelConfig, ModelPolicy, TensorConfig
from serving.registry.artifacts import file_digest
from serving.registry.versions import GuardrailRefused, Signature
from serving.replica import FORMATS, ModelLoadError, vet_pt2

_PICKLE_OPCODE_PROTO = 0x80
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


def _is_pickle(path: Path) -> bool:
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
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
        except ValueError:
            raise GuardrailRefused("payload", "not a safetensors file (bad header)") from None


def _check_torchscript(artifact: Path) -> None:
    if not zipfile.is_zipfile(artifact):
        raise GuardrailRefused("payload", "not a TorchScript archive (torch.jit.save writes a zip)")
    with zipfile.ZipFile(artifact) as zf:
        names = zf.namelist()
        if not any("/code/" in n for n in names):
            # torch.save writes the same zip layout without code: a pickled object.
            raise GuardrailRefused(
                "payload", "a torch.save pickle archive, not TorchScript (no code/ folder)"
            )
        for name in names:
            if name.endswith(".pkl"):
                _check_pickle_globals(zf.read(name), name)


def _check_pickle_globals(data: bytes, what: str) -> None:
    try:
        ops = list(pickletools.genops(data))
    except Exception as exc:
        raise GuardrailRefused("payload", f"{what}: malformed pickle: {exc}") from None
    strings: list[str] = []
    for opcode, arg, _ in ops:
        if opcode.name in ("GLOBAL", "INST"):
            module = str(arg).split(" ")[0]
            if not module.startswith(_TORCHSCRIPT_MODULES):
                raise GuardrailRefused("payload", f"{what} references {arg!r}")
        elif (
            opcode.name == "STACK_GLOBAL"
            and len(strings) >= 2
            and not strings[-2].startswith(_TORCHSCRIPT_MODULES)
        ):
            raise GuardrailRefused("payload", f"{what} references {strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)


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
        worse = (old - new) if rule.higher_is_better else (new - old)
        if not math.isfinite(new) or worse > rule.max_regression + 1e-12:
            raise GuardrailRefused(
                "metrics",
                f"{metric} {new:g} is worse than production's {old:g} by {worse:g}; the "
                f"policy allows at most {rule.max_regression:g}",
            )


def smoke_test(config: ModelConfig, policy: ModelPolicy) -> None:
    """Load and run the candidate in a child process, so a crash, a hang or a model that
    imports badly cannot take the caller down."""
    payload = json.dumps({"config": config.model_dump(mode="json"), "rows": policy.smoke_rows})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serving.replica.smoke"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=policy.smoke_timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GuardrailRefused(
            "smoke-test", f"did not load and run within {policy.smoke_timeout_s:g}s"
        ) from None
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if done.returncode != 0 or not result.get("ok"):
        reason = result.get("reason") or (done.stderr.strip().splitlines() or ["crashed"])[-1]
        raise GuardrailRefused("smoke-test", str(reason)[:2000])
