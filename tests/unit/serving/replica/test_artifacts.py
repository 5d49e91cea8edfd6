"""Artifact loading and vetting with real torch and files: every format, every refusal."""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import serving.replica.artifacts as replica_artifacts
from serving.demo.models import (
    DigitsMLP,
)
from serving.replica.artifacts import (
    ModelLoadError,
    load_module,
)

CPU = torch.device("cpu")
FORMATS = ["torchscript", "export", "safetensors"]


class TwoIn(nn.Module):
    """Two inputs, two outputs: shows positional order and tuple mapping."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(4, width)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(a) + b.sum(dim=1, keepdim=True), a.sum(dim=1, keepdim=True) - b[:, :1]


class Evil:
    """Unpickling this creates ``path``: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _class_path(cls: type) -> str:
    # __name__ is whatever pytest imported this file as, and it is in sys.modules.
    return f"{__name__}:{cls.__name__}"


def _inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=gen), torch.randn(rows, 2, generator=gen)


def _two_in() -> TwoIn:
    torch.manual_seed(0)
    return TwoIn().eval()


@pytest.fixture(scope="module")
def exported() -> torch.export.ExportedProgram:
    # torch.export.export takes ~2 s: once per module, shared by the .pt2 tests.
    batch = torch.export.Dim("batch")
    return torch.export.export(
        _two_in(), _inputs(5), dynamic_shapes=({0: batch}, {0: batch}), strict=False
    )


@pytest.fixture(scope="module")
def pt2(exported: torch.export.ExportedProgram, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "two_in.pt2"
    torch.export.save(exported, path)
    return path


def _save(fmt: str, module: TwoIn, path: Path, exported: torch.export.ExportedProgram) -> None:
    if fmt == "torchscript":
        torch.jit.script(module).save(str(path))  # type: ignore[no-untyped-call]
    elif fmt == "trace":
        torch.jit.trace(module, _inputs(2)).save(str(path))  # type: ignore[no-untyped-call]
    elif fmt == "export":
        torch.export.save(exported, path)
    else:
        safetensors.torch.save_file(module.state_dict(), path)


# ------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["torchscript", "trace", "export", "safetensors"])
def test_formats_load_and_match_the_original(
    fmt: str, tmp_path: Path, exported: torch.export.ExportedProgram
) -> None:
    original = _two_in()
    path = tmp_path / "model.bin"
    _save(fmt, original, path, exported)
    loaded = load_module(
        path, "torchscript" if fmt == "trace" else fmt, _class_path(TwoIn), {}, CPU
    )
    for rows in (1, 7):  # batch sizes other than the traced/exported example
        a, b = _inputs(rows, seed=rows)
        with torch.inference_mode():
            want, got = original(a, b), loaded(a, b)
        assert len(got) == 2
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_file(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="file not found") as info:
        load_module(tmp_path / "nope.bin", fmt, _class_path(TwoIn), {}, CPU)
    assert info.value.artifact == tmp_path / "nope.bin"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "content", [b"", b"garbage" * 100, b"PK\x03\x04 truncated zip"], ids=["empty", "text", "zip"]
)
def test_garbage_bytes(fmt: str, content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        load_module(path, fmt, _class_path(TwoIn), {}, CPU)


def test_unknown_format_and_directory(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown format 'onnx'"):
        load_module(tmp_path / "m.onnx", "onnx", None, {}, CPU)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_module(tmp_path, "torchscript", None, {}, CPU)


@pytest.mark.parametrize(
    ("model_class", "reason"),
    [
        (None, "must be 'package.module:Class'"),
        ("serving.demo.DigitsMLP", "must be 'package.module:Class'"),
        ("no_such_package_xyz.models:Net", "cannot import 'no_such_package_xyz.models'"),
        ("serving.demo:NoSuchNet", "'NoSuchNet' not found"),
        ("serving.demo:ensure_demo_model", "not a torch.nn.Module subclass"),
    ],
)
def test_safetensors_bad_class(model_class: str | None, reason: str, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(DigitsMLP().state_dict(), path)
    with pytest.raises(ModelLoadError, match=reason):
        load_module(path, "safetensors", model_class, {}, CPU)


@pytest.mark.parametrize(
    ("model_class", "kwargs", "reason"),
    [
        ("serving.demo:BenchMLP", {}, "do not match serving.demo:BenchMLP"),  # other keys
        ("serving.demo:DigitsMLP", {"hidden": 64}, "size mismatch"),  # same keys
        ("serving.demo:DigitsMLP", {"depth": 2}, "cannot construct"),
    ],
)
def test_safetensors_state_dict_mismatch(
    model_class: str, kwargs: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(DigitsMLP(hidden=128).state_dict(), path)
    with pytest.raises(ModelLoadError, match=reason):
        load_module(path, "safetensors", model_class, kwargs, CPU)


def _pickles(marker: Path) -> dict[str, bytes]:
    raw = pickle.dumps(Evil(marker))
    checkpoint = io.BytesIO()  # torch.save's zip layout: what a .pt "model" often is
    torch.save({"model": Evil(marker)}, checkpoint)
    return {"raw": raw, "torch_save": checkpoint.getvalue()}


def test_pickle_payload_works_when_unpickled(tmp_path: Path) -> None:
    # Control for the refusal tests: the payload does create its marker when run.
    marker = tmp_path / "ran"
    pickle.loads(_pickles(marker)["raw"])
    assert marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["raw", "torch_save"])
def test_pickle_is_refused_without_executing(fmt: str, kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(_pickles(marker)[kind])
    with pytest.raises(ModelLoadError):
        load_module(path, fmt, _class_path(TwoIn), {}, CPU)
    assert not marker.exists()


def _rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a zip, replacing each record by ``edit(name, data)`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def _evil_sample_inputs(marker: Path, protocol: int) -> bytes:
    buf = io.BytesIO()
    torch.save(((Evil(marker),), {}), buf, pickle_protocol=protocol)
    return buf.getvalue()


def _use_pickle(name: str, data: bytes) -> bytes:
    if not name.endswith("_weights_config.json"):
        return data
    config = json.loads(data)
    for meta in config["config"].values():
        meta["use_pickle"] = True
    return json.dumps(config).encode()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("sample_inputs_p2", "sample inputs of 'model'"),
        ("sample_inputs_p4", "sample inputs of 'model'"),
        ("sample_inputs_case", "sample inputs of 'model'"),
        ("use_pickle", "is pickled"),
        ("aotinductor", "AOTInductor"),
        ("legacy_weights", "legacy layout"),
        ("no_archive_format", "archive_format"),
    ],
)
def test_export_archive_that_would_unpickle_is_refused(
    pt2: Path, tamper: str, reason: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    root = pt2.stem

    def edit(name: str, data: bytes) -> bytes | None:
        if tamper == "sample_inputs_case" and "/data/sample_inputs/" in name:
            return None  # replaced by an upper-case twin below
        if tamper.startswith("sample_inputs") and "/data/sample_inputs/" in name:
            return _evil_sample_inputs(marker, 4 if tamper.endswith("p4") else 2)
        if tamper == "use_pickle":
            return _use_pickle(name, data)
        if tamper == "no_archive_format" and name.endswith("/archive_format"):
            return None
        return data

    path = tmp_path / "tampered.pt2"
    _rewrite(pt2, path, edit)
    extra = {
        "aotinductor": f"{root}/data/aotinductor/model/model.so",
        "legacy_weights": f"{root}/data/weights/model.pt",
        # torch finds records case-insensitively: this one is read as model.pt.
        "sample_inputs_case": f"{root}/data/sample_inputs/MODEL.pt",
    }.get(tamper)
    if extra is not None:
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr(extra, _evil_sample_inputs(marker, 2))
    with pytest.raises(ModelLoadError) as info:
        load_module(path, "export", None, {}, CPU)
    assert not marker.exists()
    assert reason in str(info.value)


def test_export_archive_with_duplicate_record_is_refused(pt2: Path, tmp_path: Path) -> None:
    path = tmp_path / "dup.pt2"
    _rewrite(pt2, path, lambda name, data: data)
    with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr(f"{pt2.stem}/data/sample_inputs/model.pt", b"shadow")
    with pytest.raises(ModelLoadError, match="duplicate record"):
        load_module(path, "export", None, {}, CPU)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
def test_export_saved_with_pickle_protocol_4_loads(
    exported: torch.export.ExportedProgram, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # torch's weights_only loader rejects protocol 4 and logs its fallback with a
    # broken format string, which pytest's log handler turns into a TypeError.
    caplog.set_level(logging.ERROR, logger="torch._export.serde.serialize")
    # Protocol 4 names globals through STACK_GLOBAL: the scan must follow it.
    path = tmp_path / "p4.pt2"
    torch.export.save(exported, path, pickle_protocol=4)
    loaded = load_module(path, "export", None, {}, CPU)
    a, b = _inputs(3)
    torch.testing.assert_close(loaded(a, b)[0], _two_in()(a, b)[0])


def test_export_archive_with_a_zip_bomb_is_refused(pt2: Path, tmp_path: Path) -> None:
    # JSON may end in any amount of white space: 6 MiB of it deflates to a few KiB.
    path = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(pt2) as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("_weights_config.json"):
                zout.writestr(name, data + b" " * (6 * 2**20), zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(name, data)
    with pytest.raises(ModelLoadError, match=r"weights_config.json' unpacks to \d+ times"):
        load_module(path, "export", None, {}, CPU)


def test_export_archive_with_a_record_over_the_limit_is_refused(
    pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_artifacts, "MAX_RECORD_BYTES", 100)
    with pytest.raises(ModelLoadError, match="may have at most 100"):
        load_module(pt2, "export", None, {}, CPU)
