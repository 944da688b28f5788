"""Issue 27's smaller items: files are written with the user's umask (not always 0600), and read-only
commands never create folders (one line, exit 2)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from medlego.jobs.synthetic import random_adapter
from medlego.runtime.adapter import save_adapter
from medlego.runtime.registry import Registry


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_follow_the_umask(tmp_path, tiny_base):
    adapter = random_adapter(tiny_base.spec, tiny_base.preprocess, seed=1)
    for mask in (0o022, 0o077):
        old = os.umask(mask)
        try:
            out = tmp_path / f"a{mask:o}.safetensors"
            save_adapter(adapter, out)
            assert _mode(out) == 0o666 & ~mask, oct(_mode(out))
            reg = Registry(tmp_path / f"reg{mask:o}")
            e = reg.register("a", adapter.to_bytes())
            assert _mode(tmp_path / f"reg{mask:o}" / "store" / f"{e.sha256}.safetensors") == 0o666 & ~mask
        finally:
            os.umask(old)


def test_read_only_commands_create_no_folder(tmp_path):
    missing = tmp_path / "srv" / "medlego"
    for argv in (["registry", "--data-dir", str(missing), "list"], ["registry", "--data-dir", str(missing), "show", "a"],
                 ["registry", "--data-dir", str(missing), "gc"]):
        r = subprocess.run([sys.executable, "-m", "medlego", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "no registry at" in r.stderr, r.stderr
        assert not (tmp_path / "srv").exists(), argv
