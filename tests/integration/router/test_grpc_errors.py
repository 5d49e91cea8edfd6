"""Bad gRPC requests: each gets its status code and details, never INTERNAL or UNKNOWN;
message limits and messages that do not decode."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from gpugate_proto import grpc_service_pb2 as pb
from gpugate_proto import grpc_service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from router.grpc_server import INFER_METHOD, SERVICE_PREFIX
from tests.integration.router.helpers import (
    ALICE,
    BIG,
    DIRECTORY_DOWN,
    GRPC_BOB,
    INVALID,
    K1,
    MAX_BYTES,
    MD_ALICE,
    MD_BOB,
    X1,
    X_BYTES,
    Stack,
    assert_affine,
    assert_grpc_good,
    codes_delta,
    grpc_infer,
    raw_request,
    request_codes,
    sample,
    typed_request,
)

pytestmark = pytest.mark.timeout(120)

UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------
# errors over gRPC: status codes
# --------------------------------------------------------------------------


def _req(**kw: Any) -> pb.ModelInferRequest:
    return raw_request(X1, K1, **kw)


def _mutate(fn: Callable[[pb.ModelInferRequest], None], base: Any = None) -> pb.ModelInferRequest:
    request = _req() if base is None else base
    fn(request)
    return request


def _set_shape(i: int, shape: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        del r.inputs[i].shape[:]
        r.inputs[i].shape.extend(shape)

    return apply


def _set_raw(i: int, data: bytes) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        r.raw_input_contents[i] = data

    return apply


def _param(key: str, **value: Any) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        r.parameters[key].CopyFrom(pb.InferParameter(**value))

    return apply


def _vec_request(shape: list[int], data: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="vec")
    request.inputs.add(name="v", datatype="FP32", shape=shape)
    request.raw_input_contents.append(data)
    return request


def _no_data(r: pb.ModelInferRequest) -> None:
    del r.raw_input_contents[:]


def _both_contents(r: pb.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])


def _typed_short(r: pb.ModelInferRequest) -> None:
    del r.inputs[0].contents.fp32_contents[-1]


def _typed_fp16(r: pb.ModelInferRequest) -> None:
    r.inputs[0].datatype = "FP16"


def _drop_input(r: pb.ModelInferRequest) -> None:
    del r.inputs[1]
    del r.raw_input_contents[1]


def _one_raw_for_two(r: pb.ModelInferRequest) -> None:
    del r.raw_input_contents[1]


def _add_unknown_input(r: pb.ModelInferRequest) -> None:
    r.inputs.add(name="z", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(X_BYTES)


def _duplicate_input(r: pb.ModelInferRequest) -> None:
    r.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(X_BYTES)


def _output(name: str) -> Callable[[pb.ModelInferRequest], None]:
    def apply(r: pb.ModelInferRequest) -> None:
        r.outputs.add(name=name)

    return apply


def _over_max_batch() -> pb.ModelInferRequest:
    x, k = sample(65, seed=9)
    return raw_request(x, k)


def _disagreeing_batch() -> pb.ModelInferRequest:
    x, _ = sample(2, seed=9)
    return raw_request(x, K1)


GRPC_CASES: list[tuple[str, Any, Any, grpc.StatusCode, str]] = [
    ("missing-key", _req(), (), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
    (
        "unknown-key",
        _req(),
        (("authorization", "Bearer nope"),),
        grpc.StatusCode.UNAUTHENTICATED,
        "unknown API key",
    ),
    (
        "not-bearer",
        _req(),
        (("authorization", ALICE),),
        grpc.StatusCode.UNAUTHENTICATED,
        "malformed Authorization",
    ),
    (
        "model-not-allowed",
        _req(),
        MD_BOB,
        grpc.StatusCode.PERMISSION_DENIED,
        "tenant 'bob' may not use model 'affine'",
    ),
    (
        "tenant-directory-down",
        _req(),
        (("authorization", f"Bearer {DIRECTORY_DOWN}"),),
        grpc.StatusCode.UNAVAILABLE,
        "cannot authenticate now: tenant directory unavailable",
    ),
    ("unknown-model", _req(model="nope"), MD_ALICE, grpc.StatusCode.NOT_FOUND, "unknown model"),
    (
        "unknown-version",
        _req(model_version="9"),
        MD_ALICE,
        grpc.StatusCode.NOT_FOUND,
        "model 'affine' has no version '9'",
    ),
    (
        "wrong-datatype",
        _mutate(lambda r: setattr(r.inputs[0], "datatype", "FP64")),
        MD_ALICE,
        INVALID,
        "input 'x' has datatype 'FP64', the model expects FP32",
    ),
    (
        "shape-mismatch",
        _mutate(_set_shape(0, [1, 5])),
        MD_ALICE,
        INVALID,
        "input 'x' has shape [1, 5]; expected [-1, 4]",
    ),
    (
        "raw-too-short",
        _mutate(_set_raw(0, X_BYTES[:12])),
        MD_ALICE,
        INVALID,
        "input 'x': 12 bytes of data for shape [1, 4] of FP32 (needs 16)",
    ),
    (
        "raw-too-long",
        _mutate(_set_raw(0, X_BYTES + X_BYTES)),
        MD_ALICE,
        INVALID,
        "input 'x': 32 bytes of data",
    ),
    (
        "raw-entries-mismatch",
        _mutate(_one_raw_for_two),
        MD_ALICE,
        INVALID,
        "raw_input_contents has 1 entries for 2 inputs",
    ),
    ("no-data", _mutate(_no_data), MD_ALICE, INVALID, "input 'x': 0 values for shape [1, 4]"),
    (
        "typed-too-short",
        _mutate(_typed_short, typed_request(X1, K1)),
        MD_ALICE,
        INVALID,
        "input 'x': 3 values for shape [1, 4] (needs 4)",
    ),
    (
        "typed-and-raw",
        _mutate(_both_contents),
        MD_ALICE,
        INVALID,
        "input 'x' has both contents and raw_input_contents",
    ),
    (
        "typed-fp16",
        _mutate(_typed_fp16, typed_request(X1, K1)),
        MD_ALICE,
        INVALID,
        "datatype 'FP16' needs raw_input_contents",
    ),
    (
        "negative-dimension",
        _mutate(_set_shape(0, [-1, 4])),
        MD_ALICE,
        INVALID,
        "input 'x' has an invalid dimension -1",
    ),
    (
        "zero-rows",
        _mutate(_set_shape(0, [0, 4])),
        MD_ALICE,
        INVALID,
        "batch size 0",
    ),
    (
        "unknown-input",
        _mutate(_add_unknown_input),
        MD_ALICE,
        INVALID,
        "unknown input 'z'; the model takes: k, x",
    ),
    ("duplicate-input", _mutate(_duplicate_input), MD_ALICE, INVALID, "input 'x' given twice"),
    ("missing-input", _mutate(_drop_input), MD_ALICE, INVALID, "missing input(s): k"),
    (
        "batch-disagreement",
        _disagreeing_batch(),
        MD_ALICE,
        INVALID,
        "inputs disagree on the batch dimension: 2 and 1",
    ),
    (
        "batch-over-max",
        _over_max_batch(),
        MD_ALICE,
        INVALID,
        "input 'x' has batch size 65; the model takes 1..64",
    ),
    (
        "unknown-output",
        _mutate(_output("nope")),
        MD_ALICE,
        INVALID,
        "unknown output(s) requested: nope",
    ),
    *[
        (
            f"bad-timeout-{name}",
            _mutate(_param("timeout", **value)),
            MD_ALICE,
            INVALID,
            "parameter 'timeout' must be a positive integer",
        )
        for name, value in [
            ("negative", dict[str, Any](int64_param=-5)),
            ("zero", {"int64_param": 0}),
            ("string", {"string_param": "soon"}),
            ("bool", {"bool_param": True}),
            ("double", {"double_param": 1.5}),
        ]
    ],
    *[
        (
            f"bad-priority-{name}",
            _mutate(_param("priority", **value)),
            MD_ALICE,
            INVALID,
            "parameter 'priority' must be 0 (default) or a level 1..3",
        )
        for name, value in [
            ("negative", dict[str, Any](int64_param=-1)),
            ("string", {"string_param": "high"}),
            ("huge", {"uint64_param": 2**63}),
        ]
    ],
]


@pytest.mark.parametrize(
    ("request_", "metadata", "code", "needle"),
    [c[1:] for c in GRPC_CASES],
    ids=[c[0] for c in GRPC_CASES],
)
def test_grpc_errors(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request_: pb.ModelInferRequest,
    metadata: Any,
    code: grpc.StatusCode,
    needle: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, metadata=metadata, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details(), err.value.details()
    assert "secret" not in err.value.details()


def test_grpc_absurd_dimensions_are_refused_without_allocating(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    cases = [
        (_mutate(_set_shape(0, [1, BIG]), _req()), "expected [-1, 4]"),
        (_mutate(_set_shape(0, [BIG, 4]), _req()), "batch size 1000000000000"),
        (_vec_request([1, BIG], b"\0" * 4), "byte request limit"),
        (_vec_request([8, 2**62], b"\0" * 4), "byte request limit"),
        (_vec_request([1, 2**63 - 1], b"\0" * 4), "byte request limit"),
    ]
    for request, needle in cases:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
        elapsed = time.perf_counter() - started
        assert err.value.code() == INVALID
        assert needle in err.value.details()
        assert elapsed < 0.5, f"{list(request.inputs[0].shape)} took {elapsed:.3f}s"


def test_grpc_message_over_limit(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """grpc core refuses an over-size message itself, before the servicer: RESOURCE_EXHAUSTED."""
    request = _vec_request([1, MAX_BYTES // 4 + 1024], b"\0" * (MAX_BYTES + 4096))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    # Small on the wire but declaring more than the request byte budget: refused by validation.
    request = _vec_request([2, MAX_BYTES // 8 + 1], b"\0" * 1024)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=MD_ALICE, timeout=10)
    assert err.value.code() == INVALID
    assert "byte request limit" in err.value.details()
    assert_grpc_good(stub)


def test_grpc_errors_through_tritonclient(gc: grpcclient.InferenceServerClient) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"headers": {}}, "StatusCode.UNAUTHENTICATED", "missing API key"),
        ({"headers": {"authorization": "Bearer x"}}, "StatusCode.UNAUTHENTICATED", "unknown"),
        ({"headers": GRPC_BOB}, "StatusCode.PERMISSION_DENIED", "may not use model"),
        ({"model": "nope"}, "StatusCode.NOT_FOUND", "unknown model"),
        ({"model_version": "7"}, "StatusCode.NOT_FOUND", "has no version '7'"),
        (
            {"outputs": [grpcclient.InferRequestedOutput("q")]},
            "StatusCode.INVALID_ARGUMENT",
            "unknown output",
        ),
    ]
    for kwargs, status, needle in cases:
        with pytest.raises(InferenceServerException) as err:
            grpc_infer(gc, X1, K1, **kwargs)
        assert err.value.status() == status, (kwargs, err.value)
        assert needle in err.value.message()
    assert_affine(grpc_infer(gc, X1, K1), X1, K1)


def test_grpc_undecodable_messages(stack: Stack, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """A message that is not its method's protobuf: INVALID_ARGUMENT on every door,
    counted like any other bad infer request (after the key is checked)."""
    good = raw_request(X1, K1).SerializeToString()
    undecodable = [
        b"\xff\xff\xff\xff",  # a field tag that never ends
        good[: len(good) - 3],  # cut inside raw_input_contents
        b"\x0a\x02\xc3\x28" + good[8:],  # model_name not UTF-8 (proto3 strings must be)
    ]
    assert good[:8] == b"\x0a\x06affine"
    before = request_codes(stack)
    with grpc.insecure_channel(stack.grpc_url) as channel:
        infer = channel.unary_unary(INFER_METHOD)
        for data in undecodable:
            with pytest.raises(grpc.RpcError) as err:
                infer(data, metadata=MD_ALICE, timeout=10)
            assert err.value.code() == INVALID, (data, err.value.details())
            assert "not a valid inference.ModelInferRequest message" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            infer(undecodable[0], timeout=10)  # no key: refused for that first
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = channel.unary_unary(SERVICE_PREFIX + "ModelMetadata")
        with pytest.raises(grpc.RpcError) as err:
            metadata(b"\x0a\x09affi", timeout=10)  # name declared 9 bytes long, 4 sent
        assert err.value.code() == INVALID
        assert "not a valid inference.ModelMetadataRequest message" in err.value.details()
    assert_grpc_good(stub)
    assert codes_delta(stack, before) == {
        ("-", "400"): len(undecodable),
        ("-", "401"): 1,
        ("affine", "200"): 1,
    }
