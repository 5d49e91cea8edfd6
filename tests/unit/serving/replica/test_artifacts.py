"""Artifact loading, the replica forward pass and the demo models, with real torch and files."""

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

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from serving.config.schema import ModelConfig, TensorConfig
from serving.demo.models import (
    BENCH_IN,
    BENCH_OUT,
    BenchMLP,
    DigitsMLP,
    bench_model_config,
    demo_accuracy,
    ensure_demo_model,
    load_digits_split,
)
from serving.replica.artifacts import (
    ModelInputError,
    ModelLoadError,
    ModelOutputError,
    ModelRunner,
    load_module,
    pick_device,
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


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"doubled": x * 2, "total": x.sum(dim=1, keepdim=True)}


class Caster(nn.Module):
    """Returns float64 and int64 where the signature promises FP32 and INT32."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.double() * 2, x.argmax(dim=1, keepdim=True)


class FirstRowOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


class RowSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


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


# -------------------------------------------------------------------------- runner


def _tensor(name: str, shape: list[int], datatype: str = "FP32") -> TensorConfig:
    return TensorConfig(name=name, datatype=datatype, shape=shape)


def _runner(
    module: nn.Module,
    tmp_path: Path,
    inputs: list[TensorConfig],
    outputs: list[TensorConfig],
) -> ModelRunner:
    path = tmp_path / f"{type(module).__name__}.pt"
    torch.jit.script(module).save(str(path))  # type: ignore[no-untyped-call]
    config = ModelConfig(
        name="m", artifact=path, format="torchscript", inputs=inputs, outputs=outputs
    )
    return ModelRunner(config, num_threads=1)


@pytest.fixture
def two_in_runner(tmp_path: Path) -> ModelRunner:
    path = tmp_path / "two_in.safetensors"
    safetensors.torch.save_file(_two_in().state_dict(), path)
    config = ModelConfig(
        name="two",
        artifact=path,
        format="safetensors",
        model_class=_class_path(TwoIn),
        inputs=[_tensor("a", [4]), _tensor("b", [2])],
        outputs=[_tensor("y", [3]), _tensor("s", [1])],
    )
    return ModelRunner(config, num_threads=1)


def test_runner_batch_equals_row_by_row(two_in_runner: ModelRunner) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 4), dtype=np.float32)
    b = rng.standard_normal((16, 2), dtype=np.float32)
    # Keys in the opposite order: the module is called in signature order.
    batch, device_ns = two_in_runner.run({"b": b, "a": a})
    assert isinstance(device_ns, int) and device_ns > 0
    assert batch["y"].shape == (16, 3) and batch["s"].shape == (16, 1)
    for i in range(16):
        row, _ = two_in_runner.run({"a": a[i : i + 1], "b": b[i : i + 1]})
        for name in ("y", "s"):
            np.testing.assert_allclose(batch[name][i : i + 1], row[name], rtol=1e-5, atol=1e-6)
    want = _two_in()(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(batch["s"], want[1].detach().numpy(), rtol=1e-6)


def test_runner_casts_inputs_and_outputs(tmp_path: Path) -> None:
    runner = _runner(
        Caster(),
        tmp_path,
        [_tensor("x", [3])],
        [_tensor("twice", [3]), _tensor("argmax", [1], "INT32")],
    )
    x = np.array([[1, 5, 2], [7, 0, 3]], dtype=np.float64)  # FP64 sent for an FP32 input
    out, _ = runner.run({"x": x})
    assert out["twice"].dtype == np.float32 and out["twice"].flags.c_contiguous
    assert out["argmax"].dtype == np.int32
    np.testing.assert_array_equal(out["twice"], (x * 2).astype(np.float32))
    np.testing.assert_array_equal(out["argmax"], [[1], [0]])


def test_runner_maps_dict_outputs_by_name(tmp_path: Path) -> None:
    runner = _runner(
        DictOut(), tmp_path, [_tensor("x", [2])], [_tensor("total", [1]), _tensor("doubled", [2])]
    )
    out, _ = runner.run({"x": np.array([[1.0, 2.0]], dtype=np.float32)})
    np.testing.assert_array_equal(out["total"], [[3.0]])
    np.testing.assert_array_equal(out["doubled"], [[2.0, 4.0]])


def test_runner_accepts_read_only_inputs(tmp_path: Path) -> None:
    # Codecs hand over np.frombuffer views of request bodies, which are read-only.
    runner = _runner(RowSum(), tmp_path, [_tensor("x", [2])], [_tensor("y", [1])])
    x = np.frombuffer(np.array([1, 2, 3, 4], dtype=np.float32).tobytes(), dtype=np.float32)
    out, _ = runner.run({"x": x.reshape(2, 2)})
    np.testing.assert_array_equal(out["y"], [[3.0], [7.0]])


def test_runner_row_count_mismatch(tmp_path: Path) -> None:
    runner = _runner(FirstRowOnly(), tmp_path, [_tensor("x", [2])], [_tensor("y", [2])])
    runner.run({"x": np.ones((1, 2), dtype=np.float32)})
    with pytest.raises(ModelOutputError, match="shape \\[1, 2\\] for 3 input rows"):
        runner.run({"x": np.ones((3, 2), dtype=np.float32)})


def test_runner_output_signature_mismatch(tmp_path: Path) -> None:
    wrong_shape = _runner(RowSum(), tmp_path, [_tensor("x", [2])], [_tensor("y", [5])])
    with pytest.raises(ModelOutputError, match="signature says"):
        wrong_shape.run({"x": np.ones((2, 2), dtype=np.float32)})
    too_few = _runner(
        RowSum(), tmp_path, [_tensor("x", [2])], [_tensor("y", [1]), _tensor("z", [1])]
    )
    with pytest.raises(ModelOutputError, match="returned 1 outputs; signature has 2"):
        too_few.run({"x": np.ones((2, 2), dtype=np.float32)})


def test_runner_input_errors(two_in_runner: ModelRunner) -> None:
    a = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ModelInputError, match="missing \\['b'\\]"):
        two_in_runner.run({"a": a})
    with pytest.raises(ModelInputError, match="unknown \\['c'\\]"):
        two_in_runner.run({"a": a, "b": np.zeros((2, 2), np.float32), "c": a})
    with pytest.raises(ModelInputError, match="'b' has 3 rows, 'a' has 2"):
        two_in_runner.run({"a": a, "b": np.zeros((3, 2), np.float32)})
    with pytest.raises(ModelInputError, match="expected \\[rows, 2\\]"):
        two_in_runner.run({"a": a, "b": np.zeros((2, 5), np.float32)})


def test_runner_warmup_and_device(tmp_path: Path) -> None:
    # A variable dim warms up as 1.
    runner = _runner(RowSum(), tmp_path, [_tensor("x", [-1])], [_tensor("y", [1])])
    runner.warmup()
    assert runner.device == CPU and runner.device_type == "cpu"
    assert torch.get_num_threads() == 1
    out, _ = runner.run({"x": np.ones((2, 5), dtype=np.float32)})
    np.testing.assert_array_equal(out["y"], [[5.0], [5.0]])


def test_pick_device() -> None:
    assert pick_device(0).type == "cpu"
    assert pick_device(1).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_error_survives_pickling() -> None:
    # Ray ships replica exceptions to the caller by pickling them.
    error = pickle.loads(pickle.dumps(ModelLoadError(Path("/m.pt"), "file not found")))
    assert isinstance(error, ModelLoadError)
    assert str(error) == "cannot load model artifact /m.pt: file not found"


# ---------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelConfig]:
    state_dir = tmp_path_factory.mktemp("state")
    return state_dir, ensure_demo_model(state_dir)


def test_demo_trains_and_records_accuracy(demo_state: tuple[Path, ModelConfig]) -> None:
    state_dir, config = demo_state
    directory = state_dir / "models" / "digits" / "1"
    assert config.artifact == directory / "model.safetensors"
    assert (config.name, config.version, config.format) == ("digits", "1", "safetensors")
    assert config.max_batch_size == 64 and config.max_queue_delay_ms == 0
    assert demo_accuracy(state_dir) >= 0.95
    meta = json.loads((directory / "model.json").read_text())
    assert meta["seed"] == 0 and meta["train_samples"] + meta["test_samples"] == 1797
    assert {"training_seconds", "created"} <= meta.keys()
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_demo_second_call_reuses(demo_state: tuple[Path, ModelConfig]) -> None:
    state_dir, config = demo_state
    files = [config.artifact, config.artifact.with_name("model.json")]
    before = [p.stat().st_mtime_ns for p in files]
    assert ensure_demo_model(state_dir) == config
    assert [p.stat().st_mtime_ns for p in files] == before


def test_demo_runner_predicts_test_digits(demo_state: tuple[Path, ModelConfig]) -> None:
    state_dir, config = demo_state
    runner = ModelRunner(config, num_threads=1)
    runner.warmup()
    _, x_test, _, y_test = load_digits_split()
    out, _ = runner.run({"pixels": x_test})  # raw pixel values 0..16
    assert out["logits"].shape == (len(x_test), 10)
    accuracy = float((out["logits"].argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(demo_accuracy(state_dir), abs=0.01)


def test_bench_model(tmp_path: Path) -> None:
    config = bench_model_config(tmp_path, hidden=64, depth=2, replicas=2, max_queue_delay_ms=2)
    assert (config.replicas, config.max_queue_delay_ms, config.max_batch_size) == (2, 2, 64)
    mtime = config.artifact.stat().st_mtime_ns
    assert bench_model_config(tmp_path, hidden=64, depth=2).artifact == config.artifact
    assert config.artifact.stat().st_mtime_ns == mtime
    runner = ModelRunner(config, num_threads=1)
    x = np.random.default_rng(0).standard_normal((5, BENCH_IN), dtype=np.float32)
    out, _ = runner.run({"x": x})
    assert out["y"].shape == (5, BENCH_OUT) and np.isfinite(out["y"]).all()
    # Seeded: the weights on disk are the ones a fresh seeded BenchMLP has.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = BenchMLP(BENCH_IN, 64, 2, BENCH_OUT).eval()
    with torch.inference_mode():
        np.testing.assert_allclose(out["y"], fresh(torch.from_numpy(x)).numpy(), rtol=1e-5)
