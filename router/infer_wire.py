"""A large ModelInferRequest read without copying its tensors.

protobuf's Python decoder copies every ``bytes`` field twice: into the message when it
decodes, and again into a new ``bytes`` object when the field is read. For a request of
raw tensors that is two copies of the whole request, made on the event loop, before the
tenant's byte cap can even refuse it. :func:`decode_infer_request` walks the top level of
a large message's wire form instead, takes each ``raw_input_contents`` entry as a view
of the bytes the door received (no copy), and has protobuf decode only the rest: the
names, shapes and parameters, a few hundred bytes. Small messages decode as before.
"""

from __future__ import annotations

from typing import Any

from gpugate_proto import grpc_service_pb2 as pb

# Below this a message is decoded whole: its copies cost less than the walk.
SPLIT_AT_BYTES = 64 * 1024

_RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_LENGTH_DELIMITED = 2


class InferRequest:
    """A ModelInferRequest whose ``raw_input_contents`` are views of the received bytes;
    every other field is the decoded message's."""

    __slots__ = ("_message", "raw_input_contents")

    def __init__(self, message: Any, raw_input_contents: list[memoryview]) -> None:
        self._message = message
        self.raw_input_contents = raw_input_contents

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; IndexError/ValueError if bad."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def split_raw_contents(data: bytes | memoryview) -> tuple[bytes, list[memoryview]] | None:
    """The message's wire form without its ``raw_input_contents`` entries, and those
    entries as views of ``data``, in order; None when the top level does not walk (let
    protobuf decode it whole and say what is wrong)."""
    view = memoryview(data).cast("B")
    end = len(view)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    pos = kept = 0
    try:
        while pos < end:
            start = pos
            tag, pos = _varint(view, pos)
            wire_type = tag & 7
            if wire_type == 0:
                _, pos = _varint(view, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == _LENGTH_DELIMITED:
                size, pos = _varint(view, pos)
                if tag >> 3 == _RAW_INPUT_CONTENTS:
                    if pos + size > end:
                        return None
                    rest.append(view[kept:start])
                    raw.append(view[pos : pos + size])
                    kept = pos + size
                pos += size
            else:  # groups: not in this message; protobuf says what is wrong
                return None
            if pos > end:
                return None
    except (IndexError, ValueError):
        return None
    rest.append(view[kept:end])
    return b"".join(rest), raw


def decode_infer_request(data: bytes | memoryview) -> Any:
    """``data`` as a ModelInferRequest (an :class:`InferRequest` when large); raises
    what protobuf raises on a message that does not decode."""
    if len(data) >= SPLIT_AT_BYTES:
        split = split_raw_contents(data)
        # The views keep the whole message alive while the tensors are (in a batch, in a
        # mirrored copy), and the byte cap counts the tensors: so views only of a message
        # that is almost all tensors.
        if split is not None and len(split[0]) < SPLIT_AT_BYTES:
            rest, raw = split
            return InferRequest(pb.ModelInferRequest.FromString(rest), raw)
    return pb.ModelInferRequest.FromString(data)
