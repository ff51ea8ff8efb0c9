"""A gRPC client for TorchServe generated, in the test session, from TorchServe's own ``inference.proto``.

The proto (and the ``google/rpc/status.proto`` it imports) ship inside ``ts/frontend/model-server.jar`` (a zip)
in the installed ``torchserve`` package; ``grpcio-tools`` compiles them into a temporary directory, so the
client always matches the frontend that runs.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import ts

PROTOS = ("inference.proto", "google/rpc/status.proto")


def generate(directory: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """``(inference_pb2, inference_pb2_grpc)``, compiled from the proto inside the installed TorchServe jar."""
    from grpc_tools import protoc

    directory = Path(directory or tempfile.mkdtemp(prefix="ts-grpc-"))
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        for name in PROTOS:
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/empty.proto
    code = protoc.main(["protoc", f"-I{directory}", f"-I{include}", f"--python_out={directory}",
                        f"--grpc_python_out={directory}", *PROTOS])  # fmt: skip
    if code != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({code}) on {PROTOS} from {jar}")
    sys.path.insert(0, str(directory))  # google.rpc.status_pb2 joins the google namespace package
    try:
        return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(directory))
