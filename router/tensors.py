"""Turning a request's declared tensors into validated numpy arrays.

Both front doors parse their wire form into :class:`InputTensor` (name,
datatype, shape, and either raw bytes or a list of values) and call
:func:`validate_inputs`, so HTTP and gRPC refuse exactly the same requests with
the same messages. Shapes are checked against the model's signature and the
byte budget BEFORE any array is built: a request that declares a huge shape is
refused without allocating.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router._exceptions import InvalidArgument

# The levels are defined beside Tenant, whose grants name them; re-exported here, where
# the request parameter is read.
from router.types import DEFAULT_PRIORITY, ModelSignature, TensorSpec
from router.types import DEFAULT_PRIORITY_LEVEL as DEFAULT_PRIORITY_LEVEL
from router.types import MAX_PRIORITY_LEVEL as MAX_PRIORITY_LEVEL
from scheduler import Tensors

# numpy kind of a datatype -> kinds of JSON / typed-contents values it accepts.
_VALUE_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | memoryview | None = None  # binary extension / raw_input_contents
    values: Any = None  # JSON "data" or typed gRPC contents


@dataclass(frozen=True)
class InferParams:
    timeout_s: float | None = None
    priority: int = DEFAULT_PRIORITY_LEVEL  # the queue's level: lower is served first


def parse_params(params: dict[str, Any]) -> InferParams:
    """Read the protocol parameters the gateway honours (``timeout`` in us, ``priority``)."""
    timeout_s = None
    if "timeout" in params:
        timeout = params["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise InvalidArgument("parameter 'timeout' must be a positive integer (microseconds)")
        timeout_s = timeout / 1e6
    priority = params.get("priority", DEFAULT_PRIORITY)
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not 0 <= priority <= MAX_PRIORITY_LEVEL
    ):
        raise InvalidArgument(
            f"parameter 'priority' must be 0 (default) or a level 1..{MAX_PRIORITY_LEVEL} "
            "(1 is the most urgent)"
        )
    return InferParams(timeout_s, priority or DEFAULT_PRIORITY_LEVEL)


def validate_inputs(
    signature: ModelSignature,
    inputs: Sequence[InputTensor],
    max_bytes: int,
    reserve: Callable[[int], None] | None = None,
) -> tuple[Tensors, int]:
    """Check inputs against the signature; return arrays (rows first) and the row count.

    ``reserve`` is called with the inputs' declared bytes once the shapes are valid and
    before any array is built (the tenant's in-flight byte budget); it may raise.
    """
    if not inputs:
        raise InvalidArgument("request has no inputs")
    seen: set[str] = set()
    rows: int | None = None
    planned: list[tuple[InputTensor, TensorSpec, int]] = []
    budget = max_bytes
    for tensor in inputs:
        spec = signature.input_by_name.get(tensor.name)
        if spec is None:
            known = ", ".join(sorted(signature.input_by_name))
            raise InvalidArgument(f"unknown input {tensor.name!r}; the model takes: {known}")
        if tensor.name in seen:
            raise InvalidArgument(f"input {tensor.name!r} given twice")
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"input {tensor.name!r} has datatype {tensor.datatype!r}, "
                f"the model expects {spec.datatype}"
            )
        tensor_rows, count = _check_shape(tensor, spec, signature.max_batch_size)
        if rows is not None and tensor_rows != rows:
            raise InvalidArgument(
                f"inputs disagree on the batch dimension: {rows} and {tensor_rows} "
                f"({tensor.name!r})"
            )
        rows = tensor_rows
        budget -= count * spec.dtype.itemsize
        if budget < 0:
            raise InvalidArgument(f"inputs declare more than the {max_bytes}-byte request limit")
        planned.append((tensor, spec, count))
    missing = [s.name for s in signature.inputs if s.name not in seen]
    if missing:
        raise InvalidArgument(f"missing input(s): {', '.join(missing)}")
    assert rows is not None
    if reserve is not None:
        reserve(max_bytes - budget)
    return {t.name: _to_array(t, spec, count) for t, spec, count in planned}, rows


def _check_shape(tensor: InputTensor, spec: TensorSpec, max_batch_size: int) -> tuple[int, int]:
    shape = tensor.shape
    want = len(spec.shape) + 1
    if len(shape) != want:
        raise InvalidArgument(
            f"input {tensor.name!r} has shape {list(shape)}; expected "
            f"{[-1, *spec.shape]} (batch dimension first)"
        )
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InvalidArgument(f"input {tensor.name!r} has an invalid dimension {dim!r}")
    rows = shape[0]
    if not 1 <= rows <= max_batch_size:
        raise InvalidArgument(
            f"input {tensor.name!r} has batch size {rows}; the model takes 1..{max_batch_size}"
        )
    for got, expected in zip(shape[1:], spec.shape, strict=True):
        if (expected != -1 and got != expected) or got == 0:
            raise InvalidArgument(
                f"input {tensor.name!r} has shape {list(shape)}; expected {[-1, *spec.shape]}"
            )
    # math.prod of validated ints cannot overflow in Python; the byte budget bounds it.
    return rows, math.prod(shape)


def _to_array(tensor: InputTensor, spec: TensorSpec, count: int) -> np.ndarray:
    dtype = spec.dtype
    if tensor.raw is not None:
        if len(tensor.raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {tensor.name!r}: {len(tensor.raw)} bytes of data for shape "
                f"{list(tensor.shape)} of {spec.datatype} (needs {count * dtype.itemsize})"
            )
        # Little-endian on the wire, as the protocol says.
        arr = np.frombuffer(tensor.raw, dtype=dtype.newbyteorder("<"))
        return arr.reshape(tuple(tensor.shape))
    if tensor.values is None:
        raise InvalidArgument(f"input {tensor.name!r} carries no data")
    _check_value_count(tensor, count)
    try:
        # numpy casts silently (1.5 -> 1 for INT64, "7" -> 7.0, null -> NaN, "x" -> True):
        # the values' own kind must fit the datatype before the checked conversion.
        values = np.asarray(tensor.values)
        kind = values.dtype.kind
        if values.size and kind not in _VALUE_KINDS[dtype.kind]:
            raise TypeError(f"got values of numpy kind {kind!r}")
        if dtype.kind == "f":
            # From the array already made (the list is converted once); a JSON number too
            # large for the datatype would become infinity. gRPC's typed contents are of
            # the datatype's own width already.
            with np.errstate(over="ignore"):
                arr = values.astype(dtype, copy=False)
            if isinstance(tensor.values, list) and dtype.itemsize < values.dtype.itemsize:
                _check_float_range(values, arr)
        else:  # integers: numpy refuses an out-of-range value here (OverflowError)
            arr = np.asarray(tensor.values, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(
            f"input {tensor.name!r}: data is not {spec.datatype}: {exc}"
        ) from None
    if arr.size != count:
        raise InvalidArgument(
            f"input {tensor.name!r}: {arr.size} values for shape {list(tensor.shape)} "
            f"(needs {count})"
        )
    return arr.reshape(tuple(tensor.shape))


def _check_float_range(values: np.ndarray, arr: np.ndarray) -> None:
    """A finite value too large for the datatype would silently become infinity."""
    overflowed = np.isinf(arr) & np.isfinite(values)
    if overflowed.any():
        bad = values[overflowed].flat[0].item()
        raise OverflowError(f"{bad!r} is out of range (largest {np.finfo(arr.dtype).max:.6g})")


def _check_value_count(tensor: InputTensor, count: int) -> None:
    """Refuse a value list of the wrong size before numpy converts it (twice)."""
    values = tensor.values
    if not isinstance(values, list):
        if hasattr(values, "__len__") and len(values) != count:  # typed gRPC contents
            raise InvalidArgument(
                f"input {tensor.name!r}: {len(values)} values for shape "
                f"{list(tensor.shape)} (needs {count})"
            )
        return
    if values and isinstance(values[0], list):
        # Nested data: every level must have exactly the declared dimension.
        level: list[Any] = [values]
        for depth, dim in enumerate(tensor.shape):
            for node in level:
                if not isinstance(node, list) or len(node) != dim:
                    raise InvalidArgument(
                        f"input {tensor.name!r}: nested data does not match shape "
                        f"{list(tensor.shape)} at depth {depth}"
                    )
            if depth < len(tensor.shape) - 1:
                level = [child for node in level for child in node]
    elif len(values) != count:
        raise InvalidArgument(
            f"input {tensor.name!r}: {len(values)} values for shape {list(tensor.shape)} "
            f"(needs {count})"
        )
