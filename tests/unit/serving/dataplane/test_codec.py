"""The data plane's wire form: tensors travel as raw bytes and come back identical."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler import BatchResult, Share
from serving.dataplane.codec import (
    ReplicaError,
    decode_batch,
    decode_result,
    encode_batch,
    encode_error,
    encode_result,
)


def test_a_batch_of_mixed_dtypes_and_shapes_round_trips_exactly() -> None:
    rng = np.random.default_rng(1)
    inputs = {
        "x": rng.random((3, 4, 5), dtype=np.float32),
        "ids": rng.integers(-(2**40), 2**40, (3, 7), dtype=np.int64),
        "mask": rng.random((3, 1)) > 0.5,
        "half": rng.random((3, 2)).astype(np.float16),
        "big_endian": np.arange(6, dtype=">i4").reshape(3, 2),
        "not_contiguous": np.arange(24, dtype=np.float64).reshape(4, 6).T[:3],
    }
    out, urgent, shares = decode_batch(encode_batch(inputs))
    assert not urgent and shares == ()
    assert decode_batch(encode_batch(inputs, urgent=True))[1]
    assert list(out) == list(inputs)  # input order is kept
    for name, arr in inputs.items():
        assert out[name].dtype == arr.dtype and out[name].shape == arr.shape, name
        np.testing.assert_array_equal(out[name], arr)


def test_a_batch_says_whose_rows_it_holds() -> None:
    shares = (Share("acme", 3, 2.5, 2), Share("b.x_y-z", 1, 1 / 3, 1))
    _, urgent, back = decode_batch(encode_batch({"x": np.zeros((4, 1))}, False, shares))
    assert back == shares and not urgent  # the weight's float exactly


@pytest.mark.parametrize(
    "line", ["acme\t1\t0.0\t2", "acme\t-1\t1.0\t2", "acme\t1\tinf\t2", "acme\t1\t1.0", "a\tx\t1\t2"]
)
def test_a_malformed_share_is_refused(line: str) -> None:
    from gpugate_proto import grpc_service_pb2 as pb

    msg = pb.ModelInferRequest()
    msg.parameters["shares"].string_param = line
    with pytest.raises(ValueError):
        decode_batch(msg.SerializeToString())


def test_a_result_keeps_outputs_and_the_measured_device_time() -> None:
    result = BatchResult(
        outputs={"logits": np.linspace(0, 1, 20, dtype=np.float32).reshape(2, 10)},
        device_ns=123_456_789_012,
        device="NVIDIA L4",
        device_share=0.25,
    )
    back = decode_result(encode_result(result))
    assert (back.device_ns, back.device, back.device_share) == (123_456_789_012, "NVIDIA L4", 0.25)
    np.testing.assert_array_equal(back.outputs["logits"], result.outputs["logits"])


def test_the_replicas_error_comes_back_as_an_error_not_a_result() -> None:
    with pytest.raises(ReplicaError, match="input 'pixels' has shape"):
        decode_result(encode_error("ModelInputError: input 'pixels' has shape [2, 3]"))


def test_object_arrays_are_refused_both_ways() -> None:
    with pytest.raises(TypeError, match="dtype object"):
        encode_batch({"s": np.array([["a"]], dtype=object)})
    from gpugate_proto import grpc_service_pb2 as pb

    msg = pb.ModelInferRequest()
    msg.inputs.add(name="s", datatype="|O", shape=[1])
    msg.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(ValueError, match="dtype object"):
        decode_batch(msg.SerializeToString())
