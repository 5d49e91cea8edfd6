"""Model artifacts and the forward pass a replica runs.

Trust model. Nothing here calls ``torch.load`` or ``pickle`` on an artifact:

* ``safetensors`` is plain data; the code is ``model_class``, imported from the
  installed packages, so it is the only format safe for weights of unknown origin.
* ``torchscript`` is read by TorchScript's C++ unpickler, which cannot call Python
  (a pickled ``__reduce__`` fails with "Unknown type name"), but the archive's
  TorchScript code still runs: the file must come from a trusted source.
* ``export`` (.pt2): ``torch.export.load`` in torch 2.13 *does* unpickle with
  ``weights_only=False`` -- the sample inputs (after a ``weights_only=True``
  attempt fails), weights and constants flagged ``use_pickle``, opaque objects
  (plain ``pickle.loads``) and the legacy zip layout -- and loads AOTInductor
  shared libraries found in the archive. :func:`vet_pt2` refuses all of those
  before torch sees the file and checks the one pickle that stays (the sample
  inputs) against an allow-list of globals without unpickling it. Other parts of
  a .pt2 are still evaluated as code by torch (sympy expressions go through
  ``sympify``, i.e. ``eval``; guard code is ``exec``'d; graph targets are resolved
  by ``getattr`` on the ``torch`` module), so like TorchScript an export artifact
  must come from a trusted source.
"""

from __future__ import annotations

import importlib
import io
import json
import pickletools
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.export.passes import move_to_device_pass

FORMATS = ("torchscript", "export", "safetensors")
_MAX_REASON = 2000


class ModelLoadError(ValueError):
    """An artifact is missing, malformed, unsafe, or does not fit its model class."""

    def __init__(self, artifact: Path | str, reason: str) -> None:
        super().__init__(f"cannot load model artifact {artifact}: {reason}")
        self.artifact = Path(artifact)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ModelLoadError], tuple[Path, str]]:
        # Ray pickles exceptions raised in replicas; the default reduce would
        # call __init__ with the formatted message only.
        return (type(self), (self.artifact, self.reason))


class ModelInputError(ValueError):
    """A batch handed to :meth:`ModelRunner.run` does not match the signature."""


class ModelOutputError(RuntimeError):
    """The model returned something that does not match its output signature."""


def pick_device(num_gpus: float) -> torch.device:
    """CUDA when the replica reserved a GPU and one is visible, else CPU."""
    if num_gpus > 0 and torch.cuda.is_available():
        # Ray sets CUDA_VISIBLE_DEVICES per replica, so the current device is ours.
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- loading


def load_module(
    artifact: Path,
    fmt: str,
    model_class: str | None,
    model_kwargs: Mapping[str, Any],
    device: torch.device,
) -> torch.nn.Module:
    """Load an artifact onto ``device``, ready for inference; raises :class:`ModelLoadError`."""
    artifact = Path(artifact)
    loader = _LOADERS.get(fmt)
    if loader is None:
        raise ModelLoadError(artifact, f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if not artifact.exists():
        raise ModelLoadError(artifact, "file not found")
    if not artifact.is_file():
        raise ModelLoadError(artifact, "not a regular file")
    try:
        return loader(artifact, model_class, dict(model_kwargs), device)
    except ModelLoadError:
        raise
    except Exception as exc:
        # torch and safetensors raise a zoo of types (RuntimeError, SafetensorError,
        # AssertionError, ...); callers only need to know the artifact is unusable.
        raise ModelLoadError(artifact, f"not a valid {fmt} artifact: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + " ..."


def _load_torchscript(
    artifact: Path, model_class: str | None, model_kwargs: dict[str, Any], device: torch.device
) -> torch.nn.Module:
    if not zipfile.is_zipfile(artifact):
        raise ModelLoadError(artifact, "not a TorchScript archive (torch.jit.save writes a zip)")
    module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
        str(artifact), map_location=device
    )
    return module.eval()


def _load_export(
    artifact: Path, model_class: str | None, model_kwargs: dict[str, Any], device: torch.device
) -> torch.nn.Module:
    vet_pt2(artifact)
    # An open file rather than the path: torch logs a warning for names not ending in .pt2.
    with artifact.open("rb") as f:
        program = torch.export.load(f)
    # Exported graphs can hold device constants (e.g. arange(device=...)); the pass
    # rewrites those too, which a plain .to(device) on the module would miss.
    program = move_to_device_pass(program, device)
    # No .eval(): train/eval behaviour is fixed at export time and the exported
    # module refuses mode switches.
    module: torch.nn.Module = program.module()
    return module


def _load_safetensors(
    artifact: Path, model_class: str | None, model_kwargs: dict[str, Any], device: torch.device
) -> torch.nn.Module:
    cls = _import_class(artifact, model_class)
    try:
        state = safetensors.torch.load_file(artifact, device="cpu")
    except Exception as exc:
        raise ModelLoadError(artifact, f"not a safetensors file: {_describe(exc)}") from exc
    try:
        module = cls(**model_kwargs)
    except Exception as exc:
        raise ModelLoadError(
            artifact, f"cannot construct {model_class}(**{model_kwargs!r}): {_describe(exc)}"
        ) from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            artifact, f"weights do not match {model_class}: {_describe(exc)}"
        ) from exc
    return module.to(device).eval()


def _import_class(artifact: Path, spec: str | None) -> type[torch.nn.Module]:
    if not spec or spec.count(":") != 1:
        raise ModelLoadError(artifact, f"model_class must be 'package.module:Class', got {spec!r}")
    module_name, _, qualname = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(
            artifact, f"model_class {spec!r}: cannot import {module_name!r}: {_describe(exc)}"
        ) from exc
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(artifact, f"model_class {spec!r}: {qualname!r} not found")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ModelLoadError(artifact, f"model_class {spec!r} is not a torch.nn.Module subclass")
    return obj


_Loader = Callable[[Path, str | None, dict[str, Any], torch.device], torch.nn.Module]
_LOADERS: dict[str, _Loader] = {
    "torchscript": _load_torchscript,
    "export": _load_export,
    "safetensors": _load_safetensors,
}


# ------------------------------------------------------------------ .pt2 vetting

# What torch.save writes for plain tensors (and the OrderedDict of backward hooks
# it attaches to each). Everything torch.load(weights_only=True) would need for
# sample inputs of tensors, numbers, strings, tuples and dicts.
_STORAGES = (
    "Float Double Half BFloat16 Long Int Short Char Byte Bool ComplexFloat ComplexDouble Untyped"
)
_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch", "device"),
    }
    | {("torch", f"{kind}Storage") for kind in _STORAGES.split()}
)
_STRING_OPS = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "SHORT_BINSTRING",
        "BINSTRING",
        "STRING",
    }
)


def vet_pt2(artifact: Path) -> None:
    """Refuse a .pt2 whose loading would unpickle anything or load native code."""

    def refuse(reason: str) -> ModelLoadError:
        return ModelLoadError(artifact, f"refused export archive: {reason}")

    if not zipfile.is_zipfile(artifact):
        raise ModelLoadError(artifact, "not a .pt2 archive (torch.export.save writes a zip)")
    with zipfile.ZipFile(artifact) as zf:
        records = _archive_records(zf, refuse)
        if records.get("archive_format") is None or zf.read(records["archive_format"]) != b"pt2":
            # torch falls back to the pre-2.8 zip layout, whose weights it unpickles.
            raise refuse("no archive_format 'pt2' record (older layouts are unpickled by torch)")
        if any(rel.startswith("data/aotinductor/") for rel in records):
            raise refuse("contains AOTInductor shared libraries (native code)")
        # Lower-cased like every key of `records`; torch's own lookups ignore case.
        models = [
            rel.removeprefix("models/").removesuffix(".json")
            for rel in records
            if rel.startswith("models/") and rel.endswith(".json")
        ]
        if "model" not in models:
            raise refuse("no models/model.json")
        for name in models:
            for legacy in (f"data/weights/{name}.pt", f"data/constants/{name}.pt"):
                if legacy in records:
                    raise refuse(f"{legacy} holds pickled tensors (legacy layout)")
            for kind in ("weights", "constants"):
                config = records.get(f"data/{kind}/{name}_{kind}_config.json")
                if config is not None:
                    _vet_payload_config(zf.read(config), kind, refuse)
            sample = records.get(f"data/sample_inputs/{name}.pt")
            if sample is not None:
                _vet_torch_save(zf.read(sample), f"sample inputs of {name!r}", refuse)


def _archive_records(
    zf: zipfile.ZipFile, refuse: Callable[[str], ModelLoadError]
) -> dict[str, str]:
    """Map lower-cased record names, without the archive's top folder, to zip names.

    torch's C++ reader finds records case-insensitively (``MODEL.pt`` answers for
    ``model.pt``), so lookups here must too, and a name that occurs twice in any
    case is refused: the copy vetted here must be the copy torch loads.
    """
    records: dict[str, str] = {}
    for name in zf.namelist():
        _, sep, rel = name.partition("/")
        if not sep:
            raise refuse(f"record {name!r} is outside the archive folder")
        if rel.lower() in records:
            raise refuse(f"duplicate record {name!r}")
        records[rel.lower()] = name
    return records


def _vet_payload_config(raw: bytes, kind: str, refuse: Callable[[str], ModelLoadError]) -> None:
    try:
        entries = json.loads(raw)["config"]
        items = [(str(fqn), dict(meta)) for fqn, meta in entries.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise refuse(f"unreadable {kind} config: {_describe(exc)}") from exc
    for fqn, meta in items:
        if meta.get("use_pickle"):
            raise refuse(f"{kind} entry {fqn!r} is pickled")
        if kind == "constants" and not str(meta.get("path_name", "")).startswith("tensor_"):
            raise refuse(f"constant {fqn!r} is a pickled Python or TorchBind object")


def _vet_torch_save(blob: bytes, what: str, refuse: Callable[[str], ModelLoadError]) -> None:
    try:
        inner = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile:
        # The legacy torch.save format is a bare sequence of pickles: never vetted.
        raise refuse(f"{what} is not in torch's zip serialization format") from None
    with inner:
        _archive_records(inner, refuse)
        for name in inner.namelist():
            if name.lower().endswith(".pkl"):
                _scan_pickle(inner.read(name), f"{what} ({name})", refuse)


def _scan_pickle(data: bytes, what: str, refuse: Callable[[str], ModelLoadError]) -> None:
    """Check a pickle's globals against :data:`_SAFE_GLOBALS` by reading opcodes only.

    Only allow-listed callables can then be reached by REDUCE/BUILD/NEWOBJ. That
    matters because torch's ``weights_only=True`` attempt fails on protocol 4+
    (it lacks the FRAME opcode) and torch then unpickles without restriction: with
    this check passed, that fallback can reach nothing but tensor constructors.
    """
    try:
        ops = [(opcode.name, arg) for opcode, arg, _ in pickletools.genops(data)]
    except ValueError as exc:
        raise refuse(f"{what}: malformed pickle: {exc}") from exc
    memo: dict[int, str | None] = {}
    # The last two values pushed, as far as they are known strings: STACK_GLOBAL
    # (protocol 4+) takes module and name from the stack instead of its argument.
    before: str | None = None
    last: str | None = None
    for op, arg in ops:
        if op in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            _check_global(module, name, what, refuse)
        elif op == "STACK_GLOBAL":
            if before is None or last is None:
                raise refuse(f"{what}: a global whose name is not a literal")
            _check_global(before, last, what, refuse)
        elif op.startswith("EXT"):
            raise refuse(f"{what}: copyreg extension codes are not allowed")
        if op == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if op in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(str(arg))] = last
            continue
        if op in _STRING_OPS:
            value: str | None = arg if isinstance(arg, str) else None
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            value = memo.get(int(str(arg)))
        else:
            value = None
        before, last = last, value


def _check_global(
    module: str, name: str, what: str, refuse: Callable[[str], ModelLoadError]
) -> None:
    if (module, name) not in _SAFE_GLOBALS:
        raise refuse(f"{what} references {module}.{name}, which is not a tensor type")
