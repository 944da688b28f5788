"""The code's shape: imports flow one way, every medlego import resolves statically, the generated
gRPC code matches its .proto, and every expected error has one answer per transport."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers it may import (besides itself); cli and benchmarks may import anything
ALLOWED = {
    "kernels": set(),
    "runtime": {"kernels"},
    "serving": {"runtime", "kernels"},
    "jobs": {"runtime", "kernels"},
    "cli": {"runtime", "kernels", "serving", "jobs", "benchmarks"},
    "benchmarks": {"runtime", "kernels", "serving", "jobs"},
}
FOLDERS = {"kernels": "kernels", "runtime": "runtime", "serving": "serving", "jobs": "jobs",
           "benchmarks": "benchmarks", "cli": "medlego/cli"}


def _imported_layers(path: Path, layer: str) -> list[tuple[int, str]]:
    """(line, layer) of every medlego layer a module imports, absolute or relative, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [f"medlego.{layer}"]
            elif node.level >= 2:  # from .. import x: the package above the layer
                names = [f"medlego.{node.module or ''}"]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "medlego" and len(parts) > 1 and parts[1] in FOLDERS:
                found.append((node.lineno, parts[1]))
    return found


def test_imports_flow_one_way():
    violations = []
    for layer, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            for line, target in _imported_layers(path, layer):
                if target != layer and target not in ALLOWED[layer]:
                    violations.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {target}")
    assert not violations, "imports against the direction serving → runtime → kernels, jobs → runtime:\n" + \
        "\n".join(violations)


def test_the_layer_check_sees_a_violation(tmp_path):
    """The walker itself: a runtime module importing serving (absolute or relative) is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from medlego.serving.app import create_app\nfrom ..serving import service\nimport os\n")
    assert _imported_layers(bad, "runtime") == [(1, "serving"), (2, "serving")]


def test_every_medlego_import_resolves_statically():
    """basedpyright (a static checker, offline) finds every medlego.* module the code imports."""
    exe = shutil.which("basedpyright") or str(Path(sys.executable).parent / "basedpyright")
    if not Path(exe).exists():
        pytest.fail("basedpyright is not installed: pip install -e '.[dev]'")
    # the folders are [tool.basedpyright] include in pyproject.toml
    proc = subprocess.run([exe, "--outputjson", "--level", "error"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    report = json.loads(proc.stdout)
    unresolved = [f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}"
                  for d in report["generalDiagnostics"]
                  if d.get("rule") in ("reportMissingImports", "reportAttributeAccessIssue")
                  and "medlego" in d["message"]]
    assert report["summary"]["filesAnalyzed"] > 80
    assert not unresolved, "\n".join(unresolved)


def test_generated_grpc_code_is_current():
    proc = subprocess.run([sys.executable, "-m", "medlego.serving.gen_proto", "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_error_class_has_one_answer_on_every_transport():
    import grpc

    from medlego.runtime import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MedlegoError)]
    assert len(classes) >= 18
    for cls in classes:
        status, code, outcome = errors.answer_of(cls("x"))
        assert 400 <= status < 600 and status != 500, cls
        assert isinstance(grpc.StatusCode[code], grpc.StatusCode), cls
        assert outcome and outcome != "error", cls
        assert errors.error_class(cls.__name__) is cls
    assert errors.answer_of(RuntimeError("bug")) == (500, "INTERNAL", "error")
    # every MedlegoError is defined in runtime/errors.py and nowhere else
    stray = []
    for folder in ("runtime", "kernels", "serving", "jobs", "benchmarks", "medlego/cli"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and path.name != "errors.py" and any(
                        getattr(b, "id", getattr(b, "attr", "")).endswith("Error") for b in node.bases):
                    stray.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not stray, stray
