"""A large ModelInferRequest decodes to the same request as protobuf's own decoder, with
its raw tensors as views of the received bytes; what does not walk falls back to
protobuf, which says what is wrong."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from gpugate_proto import grpc_service_pb2 as pb

from router.grpc_server import Malformed, _decode_inputs, decode_request
from router.infer_wire import SPLIT_AT_BYTES, InferRequest, split_raw_contents

BIG = SPLIT_AT_BYTES // 4 + 10  # FP32 values: just over the split threshold


def _request(*sizes: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="req-1")
    request.parameters["priority"].int64_param = 2
    request.parameters["tag"].string_param = "x" * 300
    for i, size in enumerate(sizes):
        request.inputs.add(name=f"in{i}", datatype="FP32", shape=[1, size])
        request.raw_input_contents.append(np.arange(size, dtype="<f4").tobytes())
    request.outputs.add(name="out")
    return request


def test_a_large_request_keeps_its_tensors_as_views_of_the_bytes() -> None:
    request = _request(BIG, 3, BIG)
    data = request.SerializeToString()
    got = decode_request(pb.ModelInferRequest, data)
    assert isinstance(got, InferRequest)
    assert [bytes(raw) for raw in got.raw_input_contents] == list(request.raw_input_contents)
    assert all(raw.obj is data for raw in got.raw_input_contents)  # no copy
    for field in ("model_name", "model_version", "id"):
        assert getattr(got, field) == getattr(request, field)
    assert dict(got.parameters) == dict(request.parameters)
    assert list(got.inputs) == list(request.inputs)
    assert [o.name for o in got.outputs] == ["out"]
    tensors = _decode_inputs(got)
    assert [t.name for t in tensors] == ["in0", "in1", "in2"]
    assert tensors[0].raw is not None
    assert np.array_equal(np.frombuffer(tensors[0].raw, "<f4"), np.arange(BIG, dtype="<f4"))


def test_raw_entries_between_other_fields_keep_their_order() -> None:
    # Serializers write fields in number order; the walk must not depend on it.
    first = _request(BIG)
    data = (
        pb.ModelInferRequest(raw_input_contents=[b"\x01" * 8]).SerializeToString()
        + pb.ModelInferRequest(model_name="m").SerializeToString()
        + first.SerializeToString()
    )
    got = decode_request(pb.ModelInferRequest, data)
    whole = pb.ModelInferRequest.FromString(data)
    assert isinstance(got, InferRequest)
    assert [bytes(raw) for raw in got.raw_input_contents] == list(whole.raw_input_contents)
    assert got.model_name == whole.model_name


def test_small_requests_decode_whole() -> None:
    request = _request(3)
    got = decode_request(pb.ModelInferRequest, request.SerializeToString())
    assert isinstance(got, pb.ModelInferRequest)
    assert got == request


def test_a_large_message_of_small_tensors_decodes_whole() -> None:
    # Views would keep the whole message alive for tensors the byte cap counts as tiny.
    request = _request(3)
    request.parameters["padding"].string_param = "p" * SPLIT_AT_BYTES
    got = decode_request(pb.ModelInferRequest, request.SerializeToString())
    assert isinstance(got, pb.ModelInferRequest)
    assert got == request


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-5],  # the last raw entry cut short
        lambda data: data + b"\x80",  # a tag that never ends
        lambda data: data + b"\x0b",  # a group (wire type 3)
        lambda data: b"\x3a\xff\xff\xff\xff\x0f" + data,  # a raw entry longer than the message
    ],
)
def test_a_message_that_does_not_walk_is_reported_as_protobuf_reports_it(
    damage: Callable[[bytes], bytes],
) -> None:
    data = damage(_request(BIG).SerializeToString())
    assert split_raw_contents(data) is None
    got = decode_request(pb.ModelInferRequest, data)
    assert isinstance(got, Malformed)
    assert "not a valid inference.ModelInferRequest message" in got.message
