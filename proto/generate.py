"""Regenerate the Python code for ``grpc_service.proto``.

Run as ``python -m gpugate_proto.generate`` or ``python proto/generate.py``.

Versions: the committed ``grpc_service_pb2.py``, ``grpc_service_pb2_grpc.py``
and ``grpc_service_pb2.pyi`` were generated with grpcio-tools 1.85.1, whose
bundled protoc emits protobuf Python gencode 7.35.1. The generated code checks
versions at import time: ``grpc_service_pb2`` raises unless the protobuf
runtime is >= 7.35.1, and ``grpc_service_pb2_grpc`` raises unless grpcio is
>= 1.85.1. Regenerate with the grpcio-tools pinned in the environment;
tests/unit/test_proto.py fails if the committed files differ from a fresh
generation.

Module names: protoc names the generated modules after the path of the .proto
relative to the include root, so the .proto is copied to
``<tmp>/gpugate_proto/`` and compiled with ``-I <tmp>``; the generated code
then imports itself as ``gpugate_proto.grpc_service_pb2``, which is how this
directory is installed (see ``[tool.setuptools.package-dir]`` in
pyproject.toml).

Descriptor pool: protoc's output registers its messages in protobuf's global
default descriptor pool. tritonclient.grpc registers the very same names
(``inference.ModelInferRequest`` ...) there from a file of another name, and
the pool refuses duplicate symbols, so the two modules could not be imported
into one process (a pytest session, a gateway that also uses tritonclient).
``generate`` therefore rewrites the one line of ``grpc_service_pb2.py`` that
picks the pool so the file is loaded into a private ``DescriptorPool``
instead; the wire format is unaffected. This works with the default upb
protobuf backend; with ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` the
pure-Python builder still registers classes in the default symbol database,
so the two modules then still clash. Code that needs the pool (e.g. gRPC
server reflection) must use ``grpc_service_pb2.DESCRIPTOR.pool``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PACKAGE = "gpugate_proto"
PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "grpc_service.proto"
GENERATED_NAMES = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "grpc_service_pb2.pyi")

_DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_LINES = (
    "# gpugate: private descriptor pool, patched in by proto/generate.py so this\n"
    "# module can be imported alongside tritonclient.grpc, which registers the\n"
    "# same inference.* names in the default pool.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def _use_private_pool(pb2_source: str) -> str:
    """Make generated ``*_pb2.py`` source load its file into a private pool."""
    count = pb2_source.count(_DEFAULT_POOL_LINE)
    if count != 1:
        raise RuntimeError(
            f"expected exactly one {_DEFAULT_POOL_LINE!r} in the generated "
            f"{PACKAGE}/grpc_service_pb2.py, found {count}; protoc's output "
            "format changed, update proto/generate.py"
        )
    return pb2_source.replace(_DEFAULT_POOL_LINE, _PRIVATE_POOL_LINES)


def generate(out_dir: Path, proto_file: Path | None = None) -> list[Path]:
    """Compile ``proto_file`` (default: the committed .proto) into ``out_dir``.

    Writes the files named in ``GENERATED_NAMES`` and returns their paths in
    that order. Raises ``RuntimeError`` if protoc fails.
    """
    from grpc_tools import protoc

    src = proto_file if proto_file is not None else PROTO_DIR / PROTO_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpugate-protoc-") as tmp_name:
        tmp = Path(tmp_name)
        include_root = tmp / "include"
        (include_root / PACKAGE).mkdir(parents=True)
        shutil.copyfile(src, include_root / PACKAGE / PROTO_NAME)
        gen_root = tmp / "gen"
        gen_root.mkdir()

        # The well-known types (google/protobuf/*.proto) ship with grpc_tools.
        wkt_include = resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{include_root}",
            f"-I{wkt_include}",
            f"--python_out={gen_root}",
            f"--pyi_out={gen_root}",
            f"--grpc_python_out={gen_root}",
            f"{PACKAGE}/{PROTO_NAME}",
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")

        written = []
        for name in GENERATED_NAMES:
            produced = gen_root / PACKAGE / name
            if not produced.is_file():
                raise RuntimeError(f"protoc did not produce {PACKAGE}/{name}")
            data = produced.read_bytes()
            if name == "grpc_service_pb2.py":
                data = _use_private_pool(data.decode("utf-8")).encode("utf-8")
            dest = out_dir / name
            dest.write_bytes(data)
            written.append(dest)
    return written


def main() -> int:
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
