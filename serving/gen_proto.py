"""Regenerate medlego_pb2.py / medlego_pb2_grpc.py from medlego.proto (committed; rerun after edits).

    python -m medlego.serving.gen_proto          # writes beside this file
    python -m medlego.serving.gen_proto --check  # exit 1 if the committed files are stale

protoc writes ``import medlego_pb2`` (a top-level import); the generated gRPC module is rewritten
to import it relative to the package, so the code works as ``medlego.serving.medlego_pb2``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "medlego.proto"
OUTPUTS = ("medlego_pb2.py", "medlego_pb2_grpc.py")


def generate(out_dir: Path) -> dict[str, str]:
    """Run grpc_tools.protoc on medlego.proto into out_dir; return {file name: text} (imports fixed)."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", str(HERE / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    texts = {name: (out_dir / name).read_text() for name in OUTPUTS}
    texts["medlego_pb2_grpc.py"] = re.sub(r"^import medlego_pb2 as", "from . import medlego_pb2 as",
                                          texts["medlego_pb2_grpc.py"], flags=re.M)
    return texts


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
