"""Tests for proto/grpc_service.proto and its generated code.

Ground truth for wire compatibility is the descriptor of Triton's
grpc_service.proto bundled in the installed tritonclient package
(tritonclient.grpc.service_pb2), and of its model_config.proto
(tritonclient.grpc.model_config_pb2) for the model configuration messages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, text_format
from gpugate_proto import generate as gen
from gpugate_proto import grpc_service_pb2 as pb2
from gpugate_proto import grpc_service_pb2_grpc as pb2_grpc
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc

from router.grpc_server import METHODS, SERVICE_PREFIX

SERVICE = "inference.GRPCInferenceService"

# Messages defined by gpugate that Triton does not have. Empty: everything we
# define is a subset of Triton's protocol; add names here deliberately.
GPUGATE_ONLY_MESSAGES: frozenset[str] = frozenset()

EXPECTED_METHODS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "RepositoryIndex",
    "ModelConfig",
    "ModelStatistics",
}


# --------------------------------------------------------------------------
# (a) the committed generated code matches the .proto
# --------------------------------------------------------------------------


def test_committed_generated_code_matches_proto(tmp_path: Path) -> None:
    written = gen.generate(tmp_path)

    assert [p.name for p in written] == list(gen.GENERATED_NAMES)
    for fresh in written:
        committed = gen.PROTO_DIR / fresh.name
        assert committed.is_file(), f"{committed} is not committed"
        assert fresh.read_bytes() == committed.read_bytes(), (
            f"{committed.name} is stale or was edited by hand; "
            "run `python -m gpugate_proto.generate` and commit the result"
        )


def test_generated_modules_import_as_gpugate_proto() -> None:
    assert pb2.DESCRIPTOR.name == "gpugate_proto/grpc_service.proto"
    assert pb2.DESCRIPTOR.package == "inference"
    # The gRPC module uses the message classes of the module we import.
    assert pb2_grpc.gpugate__proto_dot_grpc__service__pb2 is pb2


def test_private_pool_patch_fails_loudly_on_unexpected_gencode() -> None:
    with pytest.raises(RuntimeError, match="exactly one"):
        gen._use_private_pool("DESCRIPTOR = something_else()\n")


# --------------------------------------------------------------------------
# (b) wire compatibility with Triton's descriptors
# --------------------------------------------------------------------------


def _file_proto(file_descriptor: Any) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(file_descriptor.serialized_pb)


def _walk_messages(
    messages: Iterable[descriptor_pb2.DescriptorProto], prefix: str
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        full_name = f"{prefix}.{message.name}"
        yield full_name, message
        yield from _walk_messages(message.nested_type, full_name)


def _messages_by_name(
    file_proto: descriptor_pb2.FileDescriptorProto,
) -> dict[str, descriptor_pb2.DescriptorProto]:
    return dict(_walk_messages(file_proto.message_type, file_proto.package))


OURS_FILE = _file_proto(pb2.DESCRIPTOR)
TRITON_FILE = _file_proto(triton_pb2.DESCRIPTOR)
TRITON_CONFIG_FILE = _file_proto(triton_config_pb2.DESCRIPTOR)
OUR_MESSAGES = _messages_by_name(OURS_FILE)
TRITON_MESSAGES = _messages_by_name(TRITON_FILE) | _messages_by_name(TRITON_CONFIG_FILE)


def _triton_descriptor(full_name: str) -> Any:
    for module in (triton_pb2, triton_config_pb2):
        try:
            return module.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise KeyError(full_name)


def _enums_by_name(file_proto: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    enums = {f"{file_proto.package}.{e.name}": e for e in file_proto.enum_type}
    for name, message in _messages_by_name(file_proto).items():
        enums.update({f"{name}.{e.name}": e for e in message.enum_type})
    return {name: {v.name: v.number for v in e.value} for name, e in enums.items()}


def test_file_level_settings_match_triton() -> None:
    assert OURS_FILE.package == TRITON_FILE.package == "inference"
    assert OURS_FILE.syntax == TRITON_FILE.syntax == "proto3"
    assert list(OURS_FILE.dependency) == []


def test_expected_messages_are_defined() -> None:
    expected = {
        "inference.InferParameter",
        "inference.InferTensorContents",
        "inference.ModelInferRequest",
        "inference.ModelInferRequest.InferInputTensor",
        "inference.ModelInferRequest.InferRequestedOutputTensor",
        "inference.ModelInferResponse",
        "inference.ModelInferResponse.InferOutputTensor",
        "inference.ModelMetadataRequest",
        "inference.ModelMetadataResponse",
        "inference.ModelMetadataResponse.TensorMetadata",
        "inference.ModelReadyRequest",
        "inference.ModelReadyResponse",
        "inference.ServerLiveRequest",
        "inference.ServerLiveResponse",
        "inference.ServerMetadataRequest",
        "inference.ServerMetadataResponse",
        "inference.ServerReadyRequest",
        "inference.ServerReadyResponse",
        "inference.RepositoryIndexRequest",
        "inference.RepositoryIndexResponse",
        "inference.RepositoryIndexResponse.ModelIndex",
        "inference.ModelConfigRequest",
        "inference.ModelConfigResponse",
        "inference.ModelConfig",
        "inference.ModelInput",
        "inference.ModelOutput",
        "inference.ModelDynamicBatching",
        "inference.ModelQueuePolicy",
        "inference.ModelInstanceGroup",
        "inference.ModelStatisticsRequest",
        "inference.ModelStatisticsResponse",
        "inference.ModelStatistics",
        "inference.InferStatistics",
        "inference.InferBatchStatistics",
        "inference.StatisticDuration",
    }
    assert expected <= set(OUR_MESSAGES)


def test_enums_match_triton() -> None:
    ours = _enums_by_name(OURS_FILE)
    theirs = _enums_by_name(TRITON_FILE) | _enums_by_name(TRITON_CONFIG_FILE)
    assert set(ours) == {
        "inference.DataType",
        "inference.ModelInstanceGroup.Kind",
        "inference.ModelQueuePolicy.TimeoutAction",
    }
    for name, values in ours.items():
        assert values == theirs[name], name  # every value, same numbers


def test_every_message_exists_in_triton() -> None:
    unknown = set(OUR_MESSAGES) - set(TRITON_MESSAGES) - GPUGATE_ONLY_MESSAGES
    assert not unknown, f"messages not in Triton's protocol: {sorted(unknown)}"


@pytest.mark.parametrize("full_name", sorted(set(OUR_MESSAGES) & set(TRITON_MESSAGES)))
def test_message_fields_match_triton(full_name: str) -> None:
    ours = OUR_MESSAGES[full_name]
    theirs = TRITON_MESSAGES[full_name]
    assert ours.options.map_entry == theirs.options.map_entry

    their_fields = {f.name: f for f in theirs.field}
    their_numbers = {f.number: f.name for f in theirs.field}
    for field in ours.field:
        assert field.name in their_fields, f"{full_name}.{field.name} is not in Triton's message"
        other = their_fields[field.name]
        where = f"{full_name}.{field.name}"
        assert field.number == other.number, where
        assert their_numbers[field.number] == field.name, where
        assert field.type == other.type, where
        assert field.label == other.label, where
        assert field.type_name == other.type_name, where
        assert field.proto3_optional == other.proto3_optional, where
        assert field.HasField("oneof_index") == other.HasField("oneof_index"), where
        if field.HasField("oneof_index"):
            assert (
                ours.oneof_decl[field.oneof_index].name == theirs.oneof_decl[other.oneof_index].name
            ), where

    # Packed vs unpacked encoding of repeated scalars is part of the wire format.
    our_desc = pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
    their_desc = _triton_descriptor(full_name)
    for field in our_desc.fields:
        assert field.is_packed == their_desc.fields_by_name[field.name].is_packed, field.full_name


def test_infer_parameter_oneof_is_complete() -> None:
    oneof = pb2.InferParameter.DESCRIPTOR.oneofs_by_name["parameter_choice"]
    assert [f.name for f in oneof.fields] == [
        "bool_param",
        "int64_param",
        "string_param",
        "double_param",
        "uint64_param",
    ]


def test_service_methods_match_triton() -> None:
    ours = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == SERVICE

    assert {m.name for m in ours.methods} == EXPECTED_METHODS
    for method in ours.methods:
        other = theirs.methods_by_name.get(method.name)
        assert other is not None, f"{method.name} is not a Triton RPC"
        assert method.input_type.full_name == other.input_type.full_name, method.name
        assert method.output_type.full_name == other.output_type.full_name, method.name
        assert method.client_streaming == other.client_streaming, method.name
        assert method.server_streaming == other.server_streaming, method.name


def test_every_door_serves_each_method_with_its_messages() -> None:
    ours = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    served = {
        name: (request.DESCRIPTOR.full_name, response.DESCRIPTOR.full_name)
        for name, (request, response) in METHODS.items()
    }
    assert served == {
        m.name: (m.input_type.full_name, m.output_type.full_name) for m in ours.methods
    }
    assert f"/{SERVICE}/" == SERVICE_PREFIX


class _RecordingChannel:
    """Stands in for grpc.Channel; records the RPC paths a stub registers."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def unary_unary(self, path: str, *args: Any, **kwargs: Any) -> str:
        self.paths[path.rsplit("/", 1)[1]] = path
        return path

    unary_stream = stream_unary = stream_stream = unary_unary


def test_stub_rpc_paths_match_triton() -> None:
    ours = _RecordingChannel()
    theirs = _RecordingChannel()
    pb2_grpc.GRPCInferenceServiceStub(ours)
    triton_pb2_grpc.GRPCInferenceServiceStub(theirs)

    assert set(ours.paths) == EXPECTED_METHODS
    for name, path in ours.paths.items():
        assert path == f"/{SERVICE}/{name}"
        assert theirs.paths[name] == path


# --------------------------------------------------------------------------
# (c) round trips through tritonclient's classes
# --------------------------------------------------------------------------


def _as_text(message: Any) -> str:
    return str(text_format.MessageToString(message, print_unknown_fields=True))


def test_model_infer_request_round_trip_to_triton() -> None:
    raw_x = b"\x00\x00\x80?\x00\x00\x00@\x00\x00@@\x00\x00\x80@"  # FP32 [1, 2, 3, 4]
    raw_s = b"\x03\x00\x00\x00abc\x00\x00\x00\x00"  # BYTES ["abc", ""]
    request = pb2.ModelInferRequest(model_name="resnet", model_version="3", id="req-1")
    request.parameters["priority"].int64_param = -7
    request.parameters["tenant"].string_param = "acme"
    request.parameters["sequence_start"].bool_param = True
    request.parameters["timeout_s"].double_param = 1.5
    request.parameters["max_tokens"].uint64_param = 2**63 + 1
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    x.parameters["binary_data_size"].int64_param = len(raw_x)
    request.inputs.add(name="s", datatype="BYTES", shape=[2])
    typed = request.inputs.add(name="typed", datatype="INT64", shape=[3])
    typed.contents.int64_contents.extend([-1, 0, 2**40])
    out = request.outputs.add(name="y")
    out.parameters["classification"].int64_param = 2
    request.outputs.add(name="z")
    request.raw_input_contents.extend([raw_x, raw_s])

    wire = request.SerializeToString()
    parsed = triton_pb2.ModelInferRequest.FromString(wire)

    assert parsed.model_name == "resnet"
    assert parsed.model_version == "3"
    assert parsed.id == "req-1"
    assert parsed.parameters["priority"].int64_param == -7
    assert parsed.parameters["tenant"].string_param == "acme"
    assert parsed.parameters["sequence_start"].bool_param is True
    assert parsed.parameters["timeout_s"].double_param == 1.5
    assert parsed.parameters["max_tokens"].uint64_param == 2**63 + 1
    assert parsed.parameters["max_tokens"].WhichOneof("parameter_choice") == "uint64_param"
    assert [(i.name, i.datatype, list(i.shape)) for i in parsed.inputs] == [
        ("x", "FP32", [2, 2]),
        ("s", "BYTES", [2]),
        ("typed", "INT64", [3]),
    ]
    assert parsed.inputs[0].parameters["binary_data_size"].int64_param == len(raw_x)
    assert list(parsed.inputs[2].contents.int64_contents) == [-1, 0, 2**40]
    assert [o.name for o in parsed.outputs] == ["y", "z"]
    assert parsed.outputs[0].parameters["classification"].int64_param == 2
    assert list(parsed.raw_input_contents) == [raw_x, raw_s]

    # Nothing was dropped or misread: same text rendering (field names are
    # identical), no unknown fields, and identical re-serialization.
    assert _as_text(parsed) == _as_text(request)
    assert parsed.SerializeToString(deterministic=True) == request.SerializeToString(
        deterministic=True
    )


def test_model_infer_response_round_trip_from_triton() -> None:
    raw_y = bytes(range(256)) * 4
    response = triton_pb2.ModelInferResponse(model_name="resnet", model_version="3", id="req-1")
    response.parameters["sequence_end"].bool_param = False
    response.parameters["triton_final_response"].bool_param = True
    y = response.outputs.add(name="y", datatype="UINT8", shape=[4, 256])
    y.parameters["binary_data_size"].int64_param = len(raw_y)
    z = response.outputs.add(name="z", datatype="FP64", shape=[2])
    z.contents.fp64_contents.extend([0.25, -1e300])
    w = response.outputs.add(name="w", datatype="BYTES", shape=[2])
    w.contents.bytes_contents.extend([b"\x00\xff", b""])
    response.raw_output_contents.append(raw_y)

    wire = response.SerializeToString()
    parsed = pb2.ModelInferResponse.FromString(wire)

    assert (parsed.model_name, parsed.model_version, parsed.id) == ("resnet", "3", "req-1")
    assert parsed.parameters["sequence_end"].WhichOneof("parameter_choice") == "bool_param"
    assert parsed.parameters["sequence_end"].bool_param is False
    assert parsed.parameters["triton_final_response"].bool_param is True
    assert [(o.name, o.datatype, list(o.shape)) for o in parsed.outputs] == [
        ("y", "UINT8", [4, 256]),
        ("z", "FP64", [2]),
        ("w", "BYTES", [2]),
    ]
    assert parsed.outputs[0].parameters["binary_data_size"].int64_param == len(raw_y)
    assert list(parsed.outputs[1].contents.fp64_contents) == [0.25, -1e300]
    assert list(parsed.outputs[2].contents.bytes_contents) == [b"\x00\xff", b""]
    assert list(parsed.raw_output_contents) == [raw_y]

    assert _as_text(parsed) == _as_text(response)
    assert parsed.SerializeToString(deterministic=True) == response.SerializeToString(
        deterministic=True
    )


def _all_tensor_contents(module: Any) -> Any:
    return module.InferTensorContents(
        bool_contents=[True, False],
        int_contents=[-(2**31), 2**31 - 1],
        int64_contents=[-(2**63), 2**63 - 1],
        uint_contents=[0, 2**32 - 1],
        uint64_contents=[0, 2**64 - 1],
        fp32_contents=[0.5, -2.0],
        fp64_contents=[1e-300, 3.0],
        bytes_contents=[b"a", b"\x00"],
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda m: _all_tensor_contents(m),
        lambda m: m.ServerLiveResponse(live=True),
        lambda m: m.ServerReadyResponse(ready=True),
        lambda m: m.ModelReadyRequest(name="m", version="2"),
        lambda m: m.ModelReadyResponse(ready=True),
        lambda m: m.ServerMetadataResponse(
            name="gpugate", version="0.1.0", extensions=["model_repository"]
        ),
        lambda m: m.ModelMetadataRequest(name="m", version="1"),
        lambda m: m.ModelMetadataResponse(
            name="m",
            versions=["1", "2"],
            platform="pytorch_libtorch",
            inputs=[m.ModelMetadataResponse.TensorMetadata(name="x", datatype="FP32", shape=[-1])],
            outputs=[
                m.ModelMetadataResponse.TensorMetadata(name="y", datatype="INT64", shape=[-1, 3])
            ],
        ),
        lambda m: m.RepositoryIndexRequest(repository_name="", ready=True),
        lambda m: m.RepositoryIndexResponse(
            models=[
                m.RepositoryIndexResponse.ModelIndex(
                    name="m", version="1", state="UNAVAILABLE", reason="loading"
                )
            ]
        ),
    ],
    ids=[
        "InferTensorContents",
        "ServerLiveResponse",
        "ServerReadyResponse",
        "ModelReadyRequest",
        "ModelReadyResponse",
        "ServerMetadataResponse",
        "ModelMetadataRequest",
        "ModelMetadataResponse",
        "RepositoryIndexRequest",
        "RepositoryIndexResponse",
    ],
)
def test_other_messages_round_trip_both_ways(build: Any) -> None:
    ours = build(pb2)
    theirs = build(triton_pb2)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )
    from_ours = type(theirs).FromString(ours.SerializeToString())
    from_theirs = type(ours).FromString(theirs.SerializeToString())
    assert _as_text(from_ours) == _as_text(theirs)
    assert _as_text(from_theirs) == _as_text(ours)


# --------------------------------------------------------------------------
# coexistence with tritonclient in one process
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "imports",
    [
        ["tritonclient.grpc", "gpugate_proto.grpc_service_pb2_grpc"],
        ["gpugate_proto.grpc_service_pb2_grpc", "tritonclient.grpc"],
    ],
    ids=["triton-first", "gpugate-first"],
)
def test_imports_alongside_tritonclient_in_either_order(imports: list[str]) -> None:
    # Both define inference.* message names; with protobuf's default pool the
    # second import would fail with "duplicate symbol". A fresh interpreter
    # controls the import order, which this test process cannot.
    code = textwrap.dedent(
        f"""
        import importlib
        for name in {imports!r}:
            importlib.import_module(name)
        from gpugate_proto import grpc_service_pb2 as ours
        from tritonclient.grpc import service_pb2 as theirs
        wire = ours.ModelInferRequest(model_name="m").SerializeToString()
        assert theirs.ModelInferRequest.FromString(wire).model_name == "m"
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
