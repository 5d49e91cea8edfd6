"""The payload guardrail on real files: what it refuses, and that it reads only a bounded
part of an artifact into memory (measured with tracemalloc)."""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

import serving.registry.guardrails as guardrails
import serving.replica.artifacts as replica_artifacts
from serving.registry import GuardrailRefused

MiB = 2**20


@pytest.fixture
def peak() -> Iterator[Callable[[], int]]:
    """The most memory Python held at once since the test began, in bytes."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(path: Path, fmt: str) -> str:
    with pytest.raises(GuardrailRefused) as info:
        guardrails.check_payload(path, fmt)
    assert info.value.check == "payload"
    return info.value.reason


def torchscript_zip(path: Path, pkl: bytes, compress: int = zipfile.ZIP_STORED) -> Path:
    """A zip laid out like torch.jit.save's, with ``pkl`` as its data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/code/__torch__.py", "class M: pass\n")
        zf.writestr("m/data.pkl", pkl, compress_type=compress)
    return path


def test_a_safetensors_file_that_starts_like_a_pickle_passes(tmp_path: Path) -> None:
    # A header of 0x180 bytes: the file starts with 0x80, pickle's PROTO opcode.
    entry = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    header = json.dumps(entry).encode().ljust(0x180)
    path = tmp_path / "w.safetensors"
    path.write_bytes((0x180).to_bytes(8, "little") + header + b"\x00" * 4)
    assert path.read_bytes()[0] == 0x80
    assert safetensors.torch.load_file(path)["w"].shape == (1,)
    guardrails.check_payload(path, "safetensors")


def test_a_large_pickle_is_refused_after_reading_its_start(
    tmp_path: Path, peak: Callable[[], int]
) -> None:
    # PROTO 4, then BINBYTES8 announcing 256 MiB of bytes that follow (a sparse file).
    path = tmp_path / "big.pkl"
    with path.open("wb") as f:
        f.write(b"\x80\x04\x8e" + (256 * MiB).to_bytes(8, "little"))
        f.truncate(256 * MiB + 11)
    assert "is a Python pickle" in refused(path, "safetensors")
    assert peak() < 4 * MiB


def test_a_torchscript_archive_passes(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.script(torch.nn.Linear(4, 2)).save(str(path))  # type: ignore[no-untyped-call]
    guardrails.check_payload(path, "torchscript")


def test_a_zip_bomb_is_refused_without_unpacking_it(
    tmp_path: Path, peak: Callable[[], int]
) -> None:
    # Under the size limit of a pickle record (8 MiB), over a thousand times its packing.
    path = torchscript_zip(tmp_path / "bomb.pt", bytes(6 * MiB), zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 64 * 1024
    tracemalloc.reset_peak()
    reason = refused(path, "torchscript")
    assert "data.pkl" in reason and "zip bomb" in reason and "limit is 100" in reason
    assert peak() < 4 * MiB


def test_a_record_over_the_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guardrails, "MAX_PICKLE_BYTES", MiB)
    path = torchscript_zip(tmp_path / "big.pt", b"\x80\x02" + b"N0" * MiB + b"N.")
    assert "may have at most 1048576" in refused(path, "torchscript")


def test_a_pickle_of_many_opcodes_is_scanned_in_little_memory(
    tmp_path: Path, peak: Callable[[], int]
) -> None:
    # One million NONE/POP pairs, then a global TorchScript never names.
    pkl = b"\x80\x02" + b"N0" * MiB + b"cos\nsystem\n."
    path = torchscript_zip(tmp_path / "many.pt", pkl)
    tracemalloc.reset_peak()
    assert "references 'os system'" in refused(path, "torchscript")
    assert peak() < 3 * len(pkl)


def test_a_zip_whose_record_list_is_over_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over 65,535 records: zipfile writes the ZIP64 end record, which holds the size.
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/code/__torch__.py", "class M: pass\n")
        for i in range(70_000):
            zf.writestr(f"m/r/{i}", b"")
    guardrails.check_payload(path, "torchscript")  # 70,000 names fit the default limit
    monkeypatch.setattr(replica_artifacts, "MAX_ZIP_DIRECTORY_BYTES", MiB)
    reason = refused(path, "torchscript")
    assert "zip directory is" in reason and "the limit is 1048576" in reason


def test_a_safetensors_header_nested_too_deep_to_parse_is_refused(tmp_path: Path) -> None:
    header = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert "bad header" in refused(path, "safetensors")
