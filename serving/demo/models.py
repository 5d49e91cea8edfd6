"""Models the gateway can serve without any artifact from the operator.

* ``digits``: a small MLP trained at first start on scikit-learn's bundled 8x8
  digits (no download), so a fresh install answers real predictions.
* ``bench``: an MLP with seeded random weights whose forward cost grows
  sublinearly with the batch, for the batching benchmarks in ``loadtests/``.

Both are stored as safetensors (data only: the code is this module), written
atomically under a lock so replicas starting together neither train twice nor
read a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors.torch
import torch
from torch import nn

from serving.config import ModelConfig, TensorConfig

DEMO_NAME = "digits"
DEMO_VERSION = "1"
DEMO_SEED = 0
DEMO_HIDDEN = 128
_DEMO_EPOCHS = 20
_DEMO_BATCH = 32
_DEMO_LR = 0.03
_DEMO_MOMENTUM = 0.9
_DEMO_WEIGHT_DECAY = 1e-4

BENCH_IN = 256
BENCH_HIDDEN = 1024
BENCH_DEPTH = 4
BENCH_OUT = 128
BENCH_SEED = 0

_WEIGHTS = "model.safetensors"
_META = "model.json"


class DigitsMLP(nn.Module):
    """8x8 digit classifier: raw pixel values 0..16 in, 10 logits out."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, hidden: int = DEMO_HIDDEN) -> None:
        super().__init__()
        # Persistent buffers: the normalisation is saved with the weights, so
        # clients send raw pixels and no preprocessing lives outside the model.
        self.register_buffer("mean", torch.zeros(64))
        self.register_buffer("scale", torch.ones(64))
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.net((pixels - self.mean) * self.scale)
        return result


class BenchMLP(nn.Module):
    """Stack of wide linear layers.

    At one row the forward is bound by reading the weights (~14 MB by default);
    at 32 rows it is bound by arithmetic, so rows/s grows with the batch -- the
    shape of cost that makes batching worth measuring.
    """

    def __init__(
        self,
        in_features: int = BENCH_IN,
        hidden: int = BENCH_HIDDEN,
        depth: int = BENCH_DEPTH,
        out_features: int = BENCH_OUT,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.net(x)
        return result


# --------------------------------------------------------------------------- digits


def load_digits_split(
    seed: int = DEMO_SEED,
) -> tuple[
    npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """The demo's stratified 75/25 split: ``x_train, x_test, y_train, y_test``."""
    # Imported here: sklearn costs ~1 s to import and only first start needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return x_train, x_test, y_train, y_test


def ensure_demo_model(state_dir: Path) -> ModelConfig:
    """Train the digits model into ``state_dir`` unless it is there; return its config."""
    directory = Path(state_dir) / "models" / DEMO_NAME / DEMO_VERSION
    weights, meta = directory / _WEIGHTS, directory / _META
    # model.json is written after the weights, so it marks a finished artifact.
    if not (weights.is_file() and meta.is_file()):
        with _exclusive(directory):
            # Another process may have finished training while we waited for the lock.
            if not (weights.is_file() and meta.is_file()):
                model, info = _train_digits(DEMO_SEED)
                _save_weights(model, weights)
                _atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return ModelConfig(
        name=DEMO_NAME,
        version=DEMO_VERSION,
        artifact=weights,
        format="safetensors",
        model_class="serving.demo:DigitsMLP",
        model_kwargs={"hidden": DEMO_HIDDEN},
        inputs=[TensorConfig(name="pixels", datatype="FP32", shape=[64])],
        outputs=[TensorConfig(name="logits", datatype="FP32", shape=[10])],
        max_batch_size=64,
        max_queue_delay_ms=0,
    )


def demo_accuracy(state_dir: Path) -> float:
    """Test-split accuracy recorded when the demo model was trained."""
    meta = Path(state_dir) / "models" / DEMO_NAME / DEMO_VERSION / _META
    return float(json.loads(meta.read_text())["accuracy"])


def _train_digits(seed: int) -> tuple[DigitsMLP, dict[str, Any]]:
    started = time.perf_counter()
    x_train, x_test, y_train, y_test = load_digits_split(seed)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    # fork_rng: seeding must not reset the RNG of the process hosting the gateway.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsMLP(DEMO_HIDDEN)
        model.mean.copy_(xs.mean(dim=0))
        # Border pixels are (almost) always 0: a floor of one grey level keeps
        # their scale from exploding on the rare non-zero value.
        model.scale.copy_(1.0 / xs.std(dim=0).clamp_min(1.0))
        # Hand-rolled SGD with momentum: importing torch.optim pulls in
        # torch._dynamo, ~2 s of a first start that trains for under one.
        params = list(model.parameters())
        velocity = [torch.zeros_like(p) for p in params]
        order = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(_DEMO_EPOCHS):
            perm = torch.randperm(len(xs), generator=order)
            for start in range(0, len(xs), _DEMO_BATCH):
                idx = perm[start : start + _DEMO_BATCH]
                for p in params:
                    p.grad = None
                torch.autograd.backward(nn.functional.cross_entropy(model(xs[idx]), ys[idx]))
                with torch.no_grad():
                    for p, v in zip(params, velocity, strict=True):
                        assert p.grad is not None
                        v.mul_(_DEMO_MOMENTUM).add_(p.grad).add_(p, alpha=_DEMO_WEIGHT_DECAY)
                        p.sub_(v, alpha=_DEMO_LR)
    model.eval()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    info: dict[str, Any] = {
        "model": "serving.demo:DigitsMLP",
        "dataset": "sklearn.datasets.load_digits",
        "accuracy": float((predicted == y_test).mean()),
        "train_samples": len(x_train),
        "test_samples": len(x_test),
        "seed": seed,
        "hidden": DEMO_HIDDEN,
        "epochs": _DEMO_EPOCHS,
        "batch_size": _DEMO_BATCH,
        "training_seconds": round(time.perf_counter() - started, 3),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    return model, info


# ---------------------------------------------------------------------------- bench


def bench_model_config(
    state_dir: Path,
    *,
    name: str = "bench",
    version: str = "1",
    hidden: int = BENCH_HIDDEN,
    depth: int = BENCH_DEPTH,
    **overrides: Any,
) -> ModelConfig:
    """Config of a BenchMLP, writing its seeded weights under ``state_dir`` if needed.

    ``overrides`` are further ModelConfig fields (replicas, max_batch_size,
    max_queue_delay_ms, ...).
    """
    kwargs: dict[str, int | float | str | bool] = {
        "in_features": BENCH_IN,
        "hidden": hidden,
        "depth": depth,
        "out_features": BENCH_OUT,
    }
    # Named by shape, not by name/version: the weights depend only on the shape,
    # and two configs of one shape can share them.
    directory = Path(state_dir) / "models" / "bench" / f"{BENCH_IN}-{hidden}x{depth}-{BENCH_OUT}"
    weights = directory / _WEIGHTS
    if not weights.is_file():
        with _exclusive(directory):
            if not weights.is_file():
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(BENCH_SEED)
                    model = BenchMLP(BENCH_IN, hidden, depth, BENCH_OUT)
                _save_weights(model, weights)
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "artifact": weights,
        "format": "safetensors",
        "model_class": "serving.demo:BenchMLP",
        "model_kwargs": kwargs,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [BENCH_IN]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [BENCH_OUT]}],
        "max_batch_size": 64,
    }
    fields.update(overrides)
    return ModelConfig.model_validate(fields)


# ------------------------------------------------------------------------- storage


def _save_weights(model: nn.Module, path: Path) -> None:
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    _atomic_write(path, lambda tmp: safetensors.torch.save_file(state, str(tmp)))


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a temp file in the same folder and rename, so readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        # safetensors creates its files 0600; replicas of another user must read them.
        os.chmod(tmp, 0o644)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename itself is durable only once the folder is synced.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` across processes (released if we die)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
