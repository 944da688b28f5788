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

def _lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    return subprocess.run([exe, str(config), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_imports_flow_one_way():
    """import-linter's contracts in pyproject.toml: serving -> runtime -> kernels, jobs -> runtime."""
    proc = _lint_imports(ROOT, ROOT / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize("module, line", [
    ("runtime/pool.py", "from medlego.serving import service"),  # absolute, upward
    ("runtime/imaging/bands.py", "from ...serving import limits"),  # relative, from a subpackage
    ("kernels/plan.py", "import medlego.runtime.errors"),  # kernels import nothing of ours
    ("serving/limits.py", "from medlego.jobs import synthetic"),  # siblings stay apart
])
def test_a_deliberate_upward_import_breaks_a_contract(tmp_path, module, line):
    """The same contracts on a copy of the package with one import against the flow: lint-imports fails."""
    shutil.copytree(ROOT / "medlego", tmp_path / "medlego", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "medlego" / module
    target.write_text(target.read_text() + f"\n{line}  # deliberate\n")
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    proc = _lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout and "deliberate" not in proc.stderr, proc.stdout + proc.stderr


def test_only_medlego_is_importable_from_the_repository_root():
    """No top-level folder but medlego/ is a package (nothing can shadow an installed distribution), and
    nothing in the checkout is a symlink."""
    packages = sorted(d.name for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").exists())
    assert packages == ["medlego"], packages
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True).stdout
    links = [line.split("\t", 1)[1] for line in tracked.splitlines() if line.startswith("120000")]
    assert not links, f"symlinks in the repository: {links}"


def test_installed_distributions_import_from_the_repository_root():
    """`python -c` from the repository root puts the root first on sys.path (as `python -m pytest` does):
    peft and transformers import, PyPI's `kernels` (where installed) is not ours, and the old top-level
    names of our layers do not import at all."""
    probe = (
        "import importlib.util\n"
        "import peft, transformers\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or 'site-packages' in (spec.origin or ''), spec\n"
        "for name in ('runtime', 'serving', 'jobs'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        # a plain folder (benchmarks/ holds scripts and results) is at most a namespace, which never shadows
        "spec = importlib.util.find_spec('benchmarks')\n"
        "assert spec is None or spec.origin is None, spec\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def _basedpyright(cwd: Path, *files: str) -> dict:
    exe = shutil.which("basedpyright") or str(Path(sys.executable).parent / "basedpyright")
    if not Path(exe).exists():
        pytest.fail("basedpyright is not installed: pip install -e '.[dev]'")
    # the interpreter whose packages the checker reads: this one (a venv's, or the base's)
    proc = subprocess.run([exe, "--pythonpath", sys.executable, "--outputjson", "--level", "error", *files],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    report["returncode"] = proc.returncode
    return report


def test_no_type_error_beyond_the_committed_baseline():
    """basedpyright (offline) over medlego/ and tests/ ([tool.basedpyright]): every error is either fixed or
    in .basedpyright/baseline.json (those at the torch/timm boundary, where the stubs type a submodule as
    `Tensor | Module`); a new one fails. Every medlego import resolves."""
    report = _basedpyright(ROOT)
    errors = [f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}"
              for d in report["generalDiagnostics"] if d["severity"] == "error"]
    assert report["summary"]["filesAnalyzed"] > 80
    assert report["returncode"] == 0 and not errors, "\n".join(errors)


def test_a_new_type_error_in_serving_fails_the_gate(tmp_path):
    shutil.copytree(ROOT / "medlego", tmp_path / "medlego", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".basedpyright", tmp_path / ".basedpyright")
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "medlego" / "serving" / "limits.py"
    target.write_text(target.read_text() + "\n\ndef _deliberate() -> int:\n    return 'not an int'\n")
    report = _basedpyright(tmp_path, "medlego/serving/limits.py")
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    assert report["returncode"] != 0 and any("limits.py" in d["file"] and "not an int" in d["message"] for d in errors), \
        report["generalDiagnostics"]


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
    for path in (ROOT / "medlego").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and path.name != "errors.py" and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith("Error") for b in node.bases):
                stray.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not stray, stray
