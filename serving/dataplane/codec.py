"""The data plane's wire format: length-prefixed KServe v2 protobuf frames."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gpugate_proto import grpc_service_pb2 as pb

from scheduler import BatchResult, Share, Tensors

log = logging.getLogger(__name__)

MAX_MESSAGE = 2**31 - 1  # protobuf's own limit
LENGTH = struct.Struct("<I")


def encode_tensors(tensors: Mapping[str, np.ndarray[Any, Any]], msg: Any) -> None:
    """Append ``tensors`` to ``msg`` (a request's inputs or a response's outputs)."""
    is_request = isinstance(msg, pb.ModelInferRequest)
    specs = msg.inputs if is_request else msg.outputs
    raw = msg.raw_input_contents if is_request else msg.raw_output_contents
    for name, arr in tensors.items():
        if arr.dtype.hasobject:
            raise TypeError(f"tensor {name!r} has dtype object: only raw numeric data travels")
        specs.add(name=name, datatype=arr.dtype.str, shape=arr.shape)
        raw.append(np.ascontiguousarray(arr).tobytes())


def decode_tensors(specs: Any, raw: Any) -> Tensors:
    if len(specs) != len(raw):
        raise ValueError(f"{len(raw)} raw buffers for {len(specs)} tensors")
    out: Tensors = {}
    for spec, data in zip(specs, raw, strict=True):
        dtype = np.dtype(spec.datatype)
        if dtype.hasobject:
            raise ValueError(f"tensor {spec.name!r}: dtype object is not accepted")
        out[spec.name] = np.frombuffer(data, dtype=dtype).reshape(tuple(spec.shape))
    return out


def encode_result(result: BatchResult) -> bytes:
    msg = pb.ModelInferResponse()
    encode_tensors(result.outputs, msg)
    msg.parameters["device_ns"].int64_param = result.device_ns
    msg.parameters["device"].string_param = result.device
    msg.parameters["device_share"].double_param = result.device_share
    return bytes(msg.SerializeToString())


def encode_error(message: str) -> bytes:
    msg = pb.ModelInferResponse()
    msg.parameters["error"].string_param = message[:2000]
    return bytes(msg.SerializeToString())


def encode_stopping() -> bytes:
    """The answer of a replica that is shutting down to a batch it did not run. It also
    carries an error, so a gateway that does not know the flag fails the batch rather
    than reading an empty result."""
    msg = pb.ModelInferResponse()
    msg.parameters["stopping"].bool_param = True
    msg.parameters["error"].string_param = "the replica is stopping"
    return bytes(msg.SerializeToString())


class ReplicaError(Exception):
    """The replica could not run the batch (the model's own error, or bad input)."""


class ReplicaStoppingError(Exception):
    """The replica is shutting down (scaled down, or replaced) and did not run the batch:
    send it to another replica."""


def decode_result(data: bytes) -> BatchResult:
    msg = pb.ModelInferResponse.FromString(data)
    if "stopping" in msg.parameters:
        raise ReplicaStoppingError("the replica is stopping")
    if "error" in msg.parameters:
        raise ReplicaError(msg.parameters["error"].string_param)
    return BatchResult(
        outputs=decode_tensors(msg.outputs, msg.raw_output_contents),
        device_ns=msg.parameters["device_ns"].int64_param,
        device=msg.parameters["device"].string_param,
        device_share=msg.parameters["device_share"].double_param,
    )


def encode_batch(inputs: Tensors, urgent: bool = False, shares: Sequence[Share] = ()) -> bytes:
    msg = pb.ModelInferRequest()
    encode_tensors(inputs, msg)
    if urgent:
        msg.parameters["urgent"].bool_param = True
    if shares:
        # Tenant names are identifiers (no tab or newline): one line per tenant.
        msg.parameters["shares"].string_param = "\n".join(
            f"{s.tenant}\t{s.rows}\t{s.weight!r}\t{s.priority}" for s in shares
        )
    return bytes(msg.SerializeToString())


def decode_batch(data: bytes) -> tuple[Tensors, bool, tuple[Share, ...]]:
    """The batch's tensors, whether it is a latency-lane batch, and whose rows it holds
    (none when the sender did not say)."""
    msg = pb.ModelInferRequest.FromString(data)
    params = msg.parameters
    urgent = "urgent" in params and params["urgent"].bool_param
    shares: tuple[Share, ...] = ()
    if "shares" in params:
        shares = tuple(_share(line) for line in params["shares"].string_param.split("\n"))
    return decode_tensors(msg.inputs, msg.raw_input_contents), urgent, shares


def _share(line: str) -> Share:
    tenant, rows, weight, priority = line.split("\t")
    share = Share(tenant, int(rows), float(weight), int(priority))
    if share.rows < 0 or not 0 < share.weight < float("inf"):
        raise ValueError(f"bad share {line!r}")
    return share


def frame(message: bytes) -> bytes:
    return LENGTH.pack(len(message)) + message


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if size > MAX_MESSAGE:
        raise ConnectionError(f"frame of {size} bytes")
    return await reader.readexactly(size)
