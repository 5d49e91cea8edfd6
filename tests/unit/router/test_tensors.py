"""JSON and typed tensor values against the datatype the model declares."""

from __future__ import annotations

import numpy as np
import pytest

from router._exceptions import InvalidArgument
from router.tensors import InputTensor, _to_array
from router.types import TensorSpec


def _convert(datatype: str, values: object) -> np.ndarray:
    spec = TensorSpec("x", datatype, (2,))
    return _to_array(InputTensor("x", datatype, [1, 2], values=values), spec, 2)


@pytest.mark.parametrize(
    ("datatype", "values", "needle"),
    [
        ("FP32", [1.0, 1e39], "data is not FP32: 1e+39 is out of range (largest 3.40282e+38)"),
        ("FP16", [1.0, 70000.0], "data is not FP16: 70000.0 is out of range (largest 65504)"),
        ("FP16", [1, 70000], "data is not FP16: 70000 is out of range"),  # integers too
        ("INT8", [1, 300], "data is not INT8"),
        ("INT64", [1, 2**63], "data is not INT64"),
        ("FP32", [1.0, "2"], "data is not FP32: got values of numpy kind 'U'"),
        ("FP32", [True, False], "data is not FP32: got values of numpy kind 'b'"),
        ("FP32", [None, 1.0], "data is not FP32: got values of numpy kind 'O'"),
        ("INT32", [1.5, 2.0], "data is not INT32: got values of numpy kind 'f'"),
    ],
)
def test_values_the_datatype_cannot_hold_are_refused(
    datatype: str, values: object, needle: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        _convert(datatype, values)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("datatype", "values", "want"),
    [
        ("FP32", [1.5, -3.4e38], np.array([1.5, -3.4e38], np.float32)),
        ("FP16", [65504.0, 1], np.array([65504, 1], np.float16)),
        ("FP64", [1e300, 2], np.array([1e300, 2.0])),
        ("FP32", [1, 2], np.array([1, 2], np.float32)),  # integers are numbers
        ("INT8", [-128, 127], np.array([-128, 127], np.int8)),
        ("BOOL", [True, False], np.array([True, False])),
    ],
)
def test_values_that_fit_convert_exactly(datatype: str, values: object, want: np.ndarray) -> None:
    got = _convert(datatype, values)
    assert got.dtype == want.dtype and got.shape == (1, 2)
    np.testing.assert_array_equal(got.ravel(), want)


def test_typed_grpc_contents_of_the_datatypes_width_are_not_rechecked() -> None:
    # fp32_contents arrive as a float32 sequence (not a list): already in range.
    got = _convert("FP32", tuple(np.array([3.4e38, 1.0], np.float32).tolist()))
    np.testing.assert_array_equal(got.ravel(), np.array([3.4e38, 1.0], np.float32))
