"""`medlego demo` tells the truth (issue 27): each adapter's held-out accuracy is `medlego eval`'s number,
the answers it shows are a seeded sample not filtered by correctness, each marked right or wrong, its
server records audit rows, and `--keep-serving` stops with exit 0 on SIGTERM and on Ctrl-C.

A small demo (32 px, 24 training images, one epoch: weak adapters that make mistakes) is built once
with the demo's own code; `medlego demo --dir` then reuses it, as a second run of the real demo does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from backends import free_port

SCORE = re.compile(r"^  (?P<adapter>\S+) on '(?P<task>\S+)': (?:label-wise )?accuracy (?P<acc>[0-9.]+).*\n"
                   r"    \$ (?P<cmd>medlego eval .*)$", re.M)
ANSWER = re.compile(r"^answer \(HTTP 200\): (?:top label: (?P<top>.+); true label: (?P<truth>.+)"
                    r"|labels above 0\.5: (?P<found>.+); true labels: (?P<present>.+)) \[(?P<mark>right|wrong)\]$", re.M)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from medlego.jobs.demo import build_demo

    root = tmp_path_factory.mktemp("demo") / "medlego-demo"
    demo = build_demo(root, epochs=1, size=32, n_train=24, n_test=24, sample=4, log=lambda m: None)
    return root, demo


def _medlego(*argv, cwd, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "medlego", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_the_sample_is_seeded_and_never_chosen_by_the_answers(small_demo):
    from medlego.jobs.demo import DEMO_REQUESTS, sample_indices

    _, demo = small_demo
    for i, (task, adapter, fmt) in enumerate(DEMO_REQUESTS):
        sent = [r.test_index for r in demo.requests if r.task == task and r.adapter == adapter]
        assert sent == sample_indices(24, i, 4)  # a function of the split's size and the seed only
        assert all(r.path.endswith("." + fmt) for r in demo.requests if r.task == task)
    assert sample_indices(60, 0) == sample_indices(60, 0) and sample_indices(60, 0) != sample_indices(60, 1)


def test_demo_prints_evals_accuracy_and_marks_every_answer(small_demo):
    root, demo = small_demo
    r = _medlego("demo", "--dir", str(root), cwd=root.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "reusing the demo registry" in out

    scores = list(SCORE.finditer(out))
    assert {(m["adapter"], m["task"]) for m in scores} == {(s.adapter, s.task) for s in demo.scores}
    assert len(scores) == 6  # three specialists, and the generalist on each of its three tasks
    for m in scores[:2] + scores[-1:]:  # `medlego eval`, run as printed, gives the printed number
        e = _medlego(*m["cmd"].split()[1:], "--json", cwd=root.parent)
        assert e.returncode == 0, e.stderr
        assert f"{json.loads(e.stdout)['accuracy']:.4f}" == m["acc"], (m.group(0), e.stdout)

    answers = list(ANSWER.finditer(out))
    assert len(answers) == len(demo.requests) == 12
    for a, req in zip(answers, demo.requests):
        if a["top"] is not None:
            assert a["truth"] == req.truth and (a["mark"] == "right") == (a["top"] == a["truth"]), a.group(0)
        else:
            assert a["present"] == (", ".join(sorted(req.truth)) or "none")
            assert (a["mark"] == "right") == (a["found"] == a["present"]), a.group(0)
    marks = [a["mark"] for a in answers]
    assert "wrong" in marks, out  # weak adapters: the sample shows their mistakes, not a chosen few
    assert f"sample: {marks.count('right')} of 12 answers right" in out

    # the demo's server recorded each diagnosis, like any server
    from medlego.runtime.registry import Registry
    from medlego.runtime.registry.audit import query, verify

    reg = Registry(demo.data_dir)
    rows = query(reg.index, kind="diagnosis")
    assert len(rows) >= 12 and {row["adapter"].split("@")[0] for row in rows} == {"blood", "generalist"}
    assert verify(reg.index).ok


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_keep_serving_stops_cleanly(small_demo, sig):
    root, _ = small_demo
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medlego", "demo", "--dir", str(root), "--keep-serving",
                             "--port", str(port), "--grpc-port", str(free_port())], cwd=root.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # until it says it serves
        lines.append(line)
        if line.startswith("serving until") or time.monotonic() > deadline:
            break
    assert any(line.startswith("serving until") for line in lines), "".join(lines)
    os.kill(proc.pid, sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "Traceback" not in rest
