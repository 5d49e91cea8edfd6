"""KServe v2 requests for the Locust users: payloads built from the model's own metadata,
response checks, and a gRPC client whose calls are reported as Locust request events.

Nothing here imports Locust; the gRPC client is handed the ``events.request`` hook.
The locustfile calls ``grpc.experimental.gevent.init_gevent()`` before any channel
exists, so the blocking gRPC calls below yield to other greenlets.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class ModelMetadataError(RuntimeError):
    """The model's metadata could not be read, or it has tensors we cannot fill."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch dimension first (-1 = variable)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def path(self) -> str:
        version = f"/versions/{self.version}" if self.version else ""
        return f"/v2/models/{self.name}{version}"


def fetch_model_info(
    http_base: str, model: str, version: str | None, timeout_s: float
) -> ModelInfo:
    """GET the model's KServe v2 metadata (open, no key needed)."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    try:
        with urllib.request.urlopen(http_base.rstrip("/") + path, timeout=timeout_s) as resp:
            meta = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise ModelMetadataError(f"cannot read the metadata of {path}: {exc}") from exc

    def tensors(kind: str) -> tuple[Tensor, ...]:
        out = []
        for t in meta.get(kind, []):
            if t["datatype"] not in DTYPES:
                raise ModelMetadataError(f"{path}: {kind} {t['name']} is {t['datatype']}")
            out.append(Tensor(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])))
        return tuple(out)

    return ModelInfo(model, version, tensors("inputs"), tensors("outputs"))


def make_inputs(info: ModelInfo, rows: int, seed: int) -> list[tuple[Tensor, np.ndarray]]:
    """Random inputs of ``rows`` rows; variable dims past the batch dim become 1."""
    rng = np.random.default_rng(seed)
    out = []
    for t in info.inputs:
        shape = (rows, *(1 if d < 0 else d for d in t.shape[1:]))
        dtype = DTYPES[t.datatype]
        if dtype is np.bool_:
            arr = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, 16, size=shape).astype(dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        out.append((t, arr))
    return out


# ---------------------------------------------------------------------- HTTP


def json_body(inputs: list[tuple[Tensor, np.ndarray]]) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": list(a.shape),
                    "data": a.reshape(-1).tolist(),
                }
                for t, a in inputs
            ]
        },
        separators=(",", ":"),
    ).encode()


def binary_body(info: ModelInfo, inputs: list[tuple[Tensor, np.ndarray]]) -> tuple[bytes, int]:
    """Triton's binary tensor extension: JSON header, then the raw tensors; binary outputs."""
    raws = [np.ascontiguousarray(a).tobytes() for _, a in inputs]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
                for (t, a), raw in zip(inputs, raws, strict=True)
            ],
            "outputs": [
                {"name": t.name, "parameters": {"binary_data": True}} for t in info.outputs
            ],
        },
        separators=(",", ":"),
    ).encode()
    return header + b"".join(raws), len(header)


def check_http_response(body: bytes, header_length: str | None, rows: int) -> str | None:
    """None if every output has ``rows`` rows, else what is wrong."""
    try:
        n = len(body) if header_length is None else int(header_length)
        head = json.loads(body[:n])
        outputs = head["outputs"]
    except (ValueError, KeyError, TypeError):
        return "response is not a KServe v2 inference response"
    if not outputs:
        return "response has no outputs"
    for out in outputs:
        shape = out.get("shape") or [0]
        if shape[0] != rows:
            return f"output {out.get('name')} has shape {shape}, expected {rows} rows"
    return None


# ---------------------------------------------------------------------- gRPC


# Locust's ``events.request.fire`` (keyword arguments only).
FireFn = Callable[..., Any]


class GrpcInferClient:
    """KServe v2 ``ModelInfer`` over one blocking gRPC channel; each call becomes a
    Locust request event (request_type ``grpc``), so stats, charts and CSV cover it."""

    def __init__(self, target: str, fire: FireFn, timeout_s: float) -> None:
        import grpc
        from gpugate_proto import grpc_service_pb2_grpc as pb_grpc

        self._grpc = grpc
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._fire = fire
        self._timeout_s = timeout_s

    @staticmethod
    def request(info: ModelInfo, inputs: list[tuple[Tensor, np.ndarray]]) -> Any:
        from gpugate_proto import grpc_service_pb2 as pb

        request = pb.ModelInferRequest(model_name=info.name, model_version=info.version or "")
        for t, a in inputs:
            request.inputs.add(name=t.name, datatype=t.datatype, shape=list(a.shape))
            request.raw_input_contents.append(np.ascontiguousarray(a).tobytes())
        return request

    def infer(self, name: str, request: Any, key: str, rows: int, tenant: str) -> None:
        exception: Exception | None = None
        length = 0
        started = time.perf_counter()
        try:
            response = self._stub.ModelInfer(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=self._timeout_s
            )
            length = response.ByteSize()
            bad = [o.name for o in response.outputs if not o.shape or o.shape[0] != rows]
            if bad or not response.outputs:
                exception = ValueError(f"outputs {bad} do not have {rows} rows")
        except self._grpc.RpcError as exc:
            exception = GrpcStatusError(exc)
        self._fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={"tenant": tenant},
        )

    def close(self) -> None:
        self._channel.close()


class GrpcStatusError(Exception):
    """A failed call, named by its status code so Locust groups failures by it."""

    def __init__(self, exc: Any) -> None:
        code = exc.code().name if hasattr(exc, "code") and exc.code() else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        super().__init__(f"{code}: {details}")
