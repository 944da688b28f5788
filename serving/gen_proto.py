"""Regenerate medlego_pb2.py(i) / medlego_pb2_grpc.py from medlego.proto (committed; rerun after edits).

    python -m medlego.serving.gen_proto          # writes beside this file
    python -m medlego.serving.gen_proto --check  # exit 1 if the committed files are stale

protoc is run on a copy of the .proto placed at ``medlego/serving/medlego.proto`` under a temporary
include root, so the generated modules know their real import path (``medlego.serving.medlego_pb2``):
messages then pickle by reference, which Ray's gRPC proxy needs to pass them to a deployment.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "medlego.proto"
OUTPUTS = ("medlego_pb2.py", "medlego_pb2.pyi", "medlego_pb2_grpc.py")  # .pyi: the messages for static tools


def generate(work: Path) -> dict[str, str]:
    """Run grpc_tools.protoc on medlego.proto inside `work`; return {file name: generated text}."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    src, out = work / "src", work / "out"
    (src / "medlego" / "serving").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / PROTO, src / "medlego" / "serving" / PROTO)
    rc = protoc.main(["grpc_tools.protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", f"medlego/serving/{PROTO}"])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return {name: (out / "medlego" / "serving" / name).read_text() for name in OUTPUTS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
