"""Progress output stays clean in a pipe: no carriage-return progress bars when stderr is not a terminal
(`medlego merge --tune-on` here; `medlego train` and `medlego demo` in tests/test_readme_blocks.py),
and the bar is still there on a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from medlego.jobs.synthetic import make_synthetic_medmnist, random_adapter
from medlego.runtime.adapter import save_adapter

from conftest import TINY_MODEL


def _piped(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", "medlego", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_tuning_prints_no_carriage_returns_in_a_pipe(tmp_path, tiny_base, tiny_base_file):
    """(`medlego train` in a pipe: tests/test_readme_blocks.py, whose quickstart trains through one.)"""
    data = make_synthetic_medmnist(tmp_path / "d.npz", classes=3, n_train=8, n_val=6, n_test=3, size=16)
    sources = []
    for seed in (1, 2):
        p = tmp_path / f"a{seed}.safetensors"
        save_adapter(random_adapter(tiny_base.spec, tiny_base.preprocess, seed=seed, rank=2), p)
        sources.append(str(p))
    out = _piped("merge", "--method", "tsv", "-o", str(tmp_path / "m.safetensors"), *sources,
                 "--tune-on", f"task1={data}", f"task2={data}", "--model", TINY_MODEL,
                 "--base-weights", str(tiny_base_file), "--no-report")
    assert "\r" not in out and "tuned tsv" in out


def test_train_shows_its_bar_on_a_terminal(tmp_path, tiny_base_file):
    data = make_synthetic_medmnist(tmp_path / "d.npz", classes=3, n_train=8, n_val=6, n_test=3, size=16)
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "medlego", "train", "--model", TINY_MODEL, "--weights",
                             str(tiny_base_file), "--data", str(data), "--task", "t", "--epochs", "1",
                             "--batch-size", "4", "-o", str(tmp_path / "t.safetensors")],
                            stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    err = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the terminal's other side closed: the process ended
            break
        if not chunk:
            break
        err += chunk
    os.close(parent)
    assert proc.wait(timeout=300) == 0, err.decode(errors="replace")
    assert b"/2 [" in err and b"step/s" in err  # tqdm's bar over the 2 steps, as a terminal user sees it
