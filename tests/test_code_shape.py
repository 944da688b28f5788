"""The code's size: no function in medlego/ over MAX_FUNCTION_LINES lines, no serving module over
MAX_SERVING_MODULE_LINES (issue 26: small files with one job, functions one can read at once).

Generated gRPC code (``*_pb2*.py``) is exempt, and so are Triton kernels (``@triton.jit``): a kernel
is one fused loop whose parts share registers, and splitting it would cost the fusion."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medlego"
MAX_FUNCTION_LINES = 60
MAX_SERVING_MODULE_LINES = 300


def _generated(path: Path) -> bool:
    return "_pb2" in path.name


def _imports_jit_from_triton(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "triton" and any(a.name == "jit" for a in n.names)
               for n in ast.walk(tree))


def _is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef, bare_jit_is_triton: bool) -> bool:
    for decorator in fn.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator  # @triton.jit(...) too
        name = ast.unparse(target)
        if name == "triton.jit" or (name == "jit" and bare_jit_is_triton):
            return True
    return False


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' for every function or method in `path` longer than `limit` lines
    (decorators not counted; a nested function counts in its own right and inside its parent)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bare_jit = _imports_jit_from_triton(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_triton_kernel(node, bare_jit):
            continue
        assert node.end_lineno is not None
        lines = node.end_lineno - node.lineno + 1
        if lines > limit:
            out.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return out


def long_modules(paths: list[Path], limit: int = MAX_SERVING_MODULE_LINES) -> list[str]:
    """'path (N lines)' for every file in `paths` longer than `limit` lines."""
    out = []
    for path in paths:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{path} ({lines} lines)")
    return out


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if not _generated(p))


def test_no_function_over_the_limit():
    sources = _sources(PACKAGE)
    assert len(sources) > 50, f"found only {len(sources)} modules under {PACKAGE}: is the path right?"
    offenders = [line for path in sources for line in long_functions(path)]
    print("\n".join(offenders))
    assert not offenders, (f"{len(offenders)} function(s) over {MAX_FUNCTION_LINES} lines (split them into helpers "
                           "that each do one thing):\n  " + "\n  ".join(offenders))


def test_no_serving_module_over_the_limit():
    sources = _sources(PACKAGE / "serving")
    assert len(sources) > 10, f"found only {len(sources)} modules under medlego/serving: is the path right?"
    offenders = long_modules(sources)
    print("\n".join(offenders))
    assert not offenders, (f"{len(offenders)} serving module(s) over {MAX_SERVING_MODULE_LINES} lines (split them, "
                           "one job per module):\n  " + "\n  ".join(offenders))


def _body(lines: int, indent: str = "    ") -> str:
    return "".join(f"{indent}x{i} = {i}\n" for i in range(lines))


def test_the_checker_catches_a_long_function(tmp_path):
    """The checks cannot pass silently: a function one line over the limit is named, one at the limit
    is not, a triton.jit kernel is exempt, and a long file is caught."""
    over = MAX_FUNCTION_LINES + 1
    source = tmp_path / "sample.py"
    source.write_text(
        "import triton\n\n\n"
        f"def too_long():\n{_body(over - 1)}\n\n"  # the def line + (limit) body lines
        f"def just_right():\n{_body(MAX_FUNCTION_LINES - 1)}\n\n"
        f"class Holder:\n    async def long_method(self):\n{_body(over - 1, ' ' * 8)}\n\n"
        f"@triton.jit(do_not_specialize=['n'])\ndef kernel(n):\n{_body(over)}\n")
    found = long_functions(source)
    print("\n".join(found))
    assert any(f" too_long ({over} lines)" in line for line in found), found
    assert any(" long_method (" in line for line in found), found
    assert not any(" just_right " in line or " kernel " in line for line in found), found

    bare = tmp_path / "bare_jit.py"
    bare.write_text(f"from triton import jit\n\n\n@jit\ndef kernel(n):\n{_body(over)}\n")
    assert long_functions(bare) == []

    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_SERVING_MODULE_LINES + 1))
    small = tmp_path / "small.py"
    small.write_text("x = 1\n" * MAX_SERVING_MODULE_LINES)
    assert long_modules([big, small]) == [f"{big} ({MAX_SERVING_MODULE_LINES + 1} lines)"]
