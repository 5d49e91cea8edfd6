"""The replica's forward pass: whole batches, casts, signature checks, devices."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from serving.config.schema import ModelConfig, TensorConfig
from serving.replica.artifacts import (
    ModelInputError,
    ModelLoadError,
    ModelOutputError,
    pick_device,
)
from serving.replica.runner import ModelRunner

CPU = torch.device("cpu")


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


def _class_path(cls: type) -> str:
    # __name__ is whatever pytest imported this file as, and it is in sys.modules.
    return f"{__name__}:{cls.__name__}"


def _two_in() -> TwoIn:
    torch.manual_seed(0)
    return TwoIn().eval()


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
