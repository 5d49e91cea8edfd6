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
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from torch.export.passes import move_to_device_pass

FORMATS = ("torchscript", "export", "safetensors")
_MAX_REASON = 2000

# Vetting reads parts of an archive into memory (in the gateway, too): these bound it.
MAX_ZIP_DIRECTORY_BYTES = 8 * 2**20  # zipfile holds one object per record listed
MAX_RECORD_BYTES = 64 * 2**20  # a record read whole: metadata, sample inputs
MAX_PICKLE_BYTES = 8 * 2**20  # a pickle scanned opcode by opcode; tensor data lives apart
MAX_COMPRESSION_RATIO = 100  # for records over 1 MiB; deflated zeros reach ~1000
_RATIO_FLOOR = 2**20


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
    with open_archive(artifact) as zf:

        def read(name: str) -> bytes:
            return read_record(artifact, zf, name)

        records = _archive_records(zf, refuse)
        if records.get("archive_format") is None or read(records["archive_format"]) != b"pt2":
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
                    _vet_payload_config(read(config), kind, refuse)
            sample = records.get(f"data/sample_inputs/{name}.pt")
            if sample is not None:
                what = f"sample inputs of {name!r}"
                _vet_torch_save(artifact, read(sample), what, refuse)


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


def _vet_torch_save(
    artifact: Path, blob: bytes, what: str, refuse: Callable[[str], ModelLoadError]
) -> None:
    if not zipfile.is_zipfile(io.BytesIO(blob)):
        # The legacy torch.save format is a bare sequence of pickles: never vetted.
        raise refuse(f"{what} is not in torch's zip serialization format")
    with open_archive(artifact, io.BytesIO(blob)) as inner:
        _archive_records(inner, refuse)
        for name in inner.namelist():
            if name.lower().endswith(".pkl"):
                data = read_record(artifact, inner, name, MAX_PICKLE_BYTES)
                _scan_pickle(data, f"{what} ({name})", refuse)


def _scan_pickle(data: bytes, what: str, refuse: Callable[[str], ModelLoadError]) -> None:
    """Check a pickle's globals against :data:`_SAFE_GLOBALS` by reading opcodes only.

    Only allow-listed callables can then be reached by REDUCE/BUILD/NEWOBJ. That
    matters because torch's ``weights_only=True`` attempt fails on protocol 4+
    (it lacks the FRAME opcode) and torch then unpickles without restriction: with
    this check passed, that fallback can reach nothing but tensor constructors.
    """
    # Opcode by opcode, never as a list: a small pickle can hold millions of opcodes.
    ops = ((opcode.name, arg) for opcode, arg, _ in pickletools.genops(data))
    try:
        _scan_ops(ops, what, refuse)
    except ValueError as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise refuse(f"{what}: malformed pickle: {exc}") from exc


def _scan_ops(
    ops: Iterator[tuple[str, Any]], what: str, refuse: Callable[[str], ModelLoadError]
) -> None:
    # Memoized strings only: the memo's other values can never name a global.
    memo: dict[int, str] = {}
    memoized = 0
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
        if op in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            index = memoized if op == "MEMOIZE" else int(str(arg))
            memoized += op == "MEMOIZE"
            if last is None:
                memo.pop(index, None)
            else:
                memo[index] = last
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


# ------------------------------------------------------------------ zip limits

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"


def _directory_size(f: IO[bytes]) -> int | None:
    """The central directory's size in bytes, found as zipfile finds it (the end record
    with no comment, else the last one within a comment's reach, then its ZIP64 record);
    None when there is no end record, which zipfile refuses too."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    tail_len = min(size, _EOCD.size + 0xFFFF + _ZIP64_LOCATOR.size + _ZIP64_EOCD.size)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = len(tail) - _EOCD.size
    if not (at >= 0 and tail[at:].startswith(_EOCD_SIGNATURE) and tail.endswith(b"\0\0")):
        at = tail.rfind(_EOCD_SIGNATURE, max(0, len(tail) - _EOCD.size - 0xFFFF))
        if at < 0 or at + _EOCD.size > len(tail):
            return None
    directory: int = _EOCD.unpack_from(tail, at)[6]
    locator_at = at - _ZIP64_LOCATOR.size
    record_at = locator_at - _ZIP64_EOCD.size
    if (
        record_at >= 0
        and _ZIP64_LOCATOR.unpack_from(tail, locator_at)[0] == _ZIP64_LOCATOR_SIGNATURE
        and _ZIP64_EOCD.unpack_from(tail, record_at)[0] == _ZIP64_EOCD_SIGNATURE
    ):
        directory = _ZIP64_EOCD.unpack_from(tail, record_at)[8]
    return directory


def open_archive(artifact: Path, data: IO[bytes] | None = None) -> zipfile.ZipFile:
    """Open ``artifact`` (or ``data``, a zip found inside it) as a zip archive, refusing
    one whose list of records is over :data:`MAX_ZIP_DIRECTORY_BYTES`.

    Raises :class:`ModelLoadError`.
    """
    try:
        if data is None:
            with artifact.open("rb") as f:
                directory = _directory_size(f)
        else:
            directory = _directory_size(data)
            data.seek(0)
    except OSError as exc:
        raise ModelLoadError(artifact, f"unreadable: {_describe(exc)}") from exc
    if directory is not None and directory > MAX_ZIP_DIRECTORY_BYTES:
        raise ModelLoadError(
            artifact,
            f"its zip directory is {directory} bytes; the limit is {MAX_ZIP_DIRECTORY_BYTES}",
        )
    try:
        return zipfile.ZipFile(artifact if data is None else data)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ModelLoadError(artifact, f"not a readable zip archive: {_describe(exc)}") from exc


def read_record(artifact: Path, zf: zipfile.ZipFile, name: str, limit: int | None = None) -> bytes:
    """Record ``name`` of ``zf`` (an archive of ``artifact``), read whole into memory only
    when neither its stored nor its unpacked size is over ``limit`` (default
    :data:`MAX_RECORD_BYTES`) and it unpacks to at most :data:`MAX_COMPRESSION_RATIO`
    times its stored size; else :class:`ModelLoadError`."""
    limit = MAX_RECORD_BYTES if limit is None else limit
    info = zf.getinfo(name)
    if max(info.file_size, info.compress_size) > limit:
        raise ModelLoadError(
            artifact,
            f"record {name!r} is {max(info.file_size, info.compress_size)} bytes; records "
            f"read to vet the archive may have at most {limit}",
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_FLOOR and ratio > MAX_COMPRESSION_RATIO:
        raise ModelLoadError(
            artifact,
            f"record {name!r} unpacks to {ratio:.0f} times its stored size (a zip bomb?); "
            f"the limit is {MAX_COMPRESSION_RATIO}",
        )
    try:
        return zf.read(info)
    except (
        zipfile.BadZipFile,
        zlib.error,
        OSError,
        EOFError,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        raise ModelLoadError(artifact, f"record {name!r} is unreadable: {_describe(exc)}") from exc
