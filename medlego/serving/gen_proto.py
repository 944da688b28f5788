"""Regenerate the committed gRPC stubs from this folder's .proto files (rerun after edits).

    python -m medlego.serving.gen_proto          # writes beside this file
    python -m medlego.serving.gen_proto --check  # exit 1 if the committed files are stale

Two protos: ``medlego.proto`` (``medlego.v1.Medlego``) and ``kserve_v2.proto`` (the Open Inference
Protocol's ``inference.GRPCInferenceService``). Each gives ``<name>_pb2.py``, ``<name>_pb2.pyi``
(the messages for static tools) and ``<name>_pb2_grpc.py``.

protoc is run on a copy of each .proto placed at ``medlego/serving/<file>`` under a temporary
include root, so the generated modules know their real import path (``medlego.serving.medlego_pb2``):
messages then pickle by reference, which Ray's gRPC proxy needs to pass them to a deployment.

The output is then made independent of the protoc that wrote it (see :func:`portable`):

* protoc ≥ 5.26 emits ``runtime_version.ValidateProtobufRuntimeVersion(<its own version>)``,
  which refuses every protobuf runtime older than the generator (the committed files said 7.35.1,
  so ``tritonclient[grpc]``, which needs protobuf < 7, broke the server with ``VersionError``).
  The code itself uses only what every protobuf since 5.26 has (the ``builder`` module,
  ``AddSerializedFile``), so the check is removed: the stubs run on protobuf 5.29–7.x (the range
  ``pyproject.toml`` allows; ``tests/test_proto_range.py`` serves a request on the oldest).
* grpc_tools emits the same kind of check against grpcio (``GRPC_GENERATED_VERSION``); removed
  for the same reason (the stubs use ``_registered_method``, which grpcio has since 1.63).
* the generator's version comment goes too, so ``--check`` passes with any grpcio-tools that
  writes the same code.
* ``kserve_v2`` only: its messages are added to a descriptor pool of their own, not protobuf's
  default pool. Clients such as ``tritonclient.grpc`` register their own copy of the protocol's
  messages (same full names, ``inference.*``, another file) in the default pool, and one pool
  refuses a second definition of a name: a process that imports both (a test, a gateway) would
  fail at import. ``kserve_grpc.reflection_pool`` builds the reflection pool over both.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("medlego.proto", "kserve_v2.proto")
OWN_POOL = ("kserve_v2.proto",)  # generated into a private descriptor pool (see the module docstring)


def outputs(proto: str) -> tuple[str, ...]:
    stem = proto.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


_NOTE = "# medlego: generator version checks removed by serving/gen_proto.py (see its docstring)\n"


def _cut(text: str, first: str, last: str | None, name: str, keep: str = "") -> str:
    """`text` with the one block of lines from the line starting with `first` to the next line equal to
    `last` (None: that line alone) replaced by `keep`."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(first)]
    if len(starts) != 1:
        raise RuntimeError(f"{name}: expected one line starting with {first!r} in protoc's output, found "
                           f"{len(starts)}; update gen_proto.portable")
    i = starts[0]
    j = i if last is None else next((k for k in range(i, len(lines)) if lines[k].rstrip("\n") == last), None)
    if j is None:
        raise RuntimeError(f"{name}: no {last!r} after {first!r}; update gen_proto.portable")
    return "".join(lines[:i]) + keep + "".join(lines[j + 1:])


def portable(name: str, text: str, own_pool: bool) -> str:
    """protoc's output for file `name`, without its generator-version checks (module docstring)."""
    if name.endswith("_pb2.py"):
        text = _cut(text, "from google.protobuf import runtime_version", None, name)
        text = _cut(text, "_runtime_version.ValidateProtobufRuntimeVersion(", ")", name)
        text = _cut(text, "# Protobuf Python Version: ", None, name, keep=_NOTE)
        if own_pool:
            default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
            if text.count(default) != 1:
                raise RuntimeError(f"{name}: expected one {default!r} in protoc's output; update gen_proto.portable")
            text = text.replace(default, "POOL = _descriptor_pool.DescriptorPool()  # not the default pool: see gen_proto\n"
                                         "DESCRIPTOR = POOL.AddSerializedFile(")
    elif name.endswith("_pb2_grpc.py"):
        text = _cut(text, "GRPC_GENERATED_VERSION = ", "    )", name, keep=_NOTE)
        text = text.replace("import warnings\n", "", 1)
    return text


def generate(work: Path) -> dict[str, str]:
    """Run grpc_tools.protoc on every proto inside `work`; return {file name: portable text}."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    src, out = work / "src", work / "out"
    (src / "medlego" / "serving").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    for proto in PROTOS:
        shutil.copyfile(HERE / proto, src / "medlego" / "serving" / proto)
        rc = protoc.main(["grpc_tools.protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                          f"--grpc_python_out={out}", f"medlego/serving/{proto}"])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} with exit code {rc}")
        for name in outputs(proto):
            texts[name] = portable(name, (out / "medlego" / "serving" / name).read_text(), proto in OWN_POOL)
    return texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        texts = generate(Path(tmp))
    if args.check:
        stale = [n for n, t in texts.items() if not (HERE / n).is_file() or (HERE / n).read_text() != t]
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run python -m medlego.serving.gen_proto")
            return 1
        print("generated code is up to date")
        return 0
    for name, text in texts.items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
