"""The documents' examples run as written: the README's set-up (`medlego demo`), then every shell (and
Python) block of the README's *Two-minute quickstart* and *Serving in one minute*, of docs/serving.md
and of docs/fleet.md's *A fleet* (a fleet on one machine: `medlego dev-fleet`, two servers sharing its
PostgreSQL and S3), in that order, in one bash shell, in one fresh folder.

What a new user does, step by step, after `pip install`: blocks use only the files earlier blocks
made (the demo folder, `medlego samples -o …`, the adapter the quickstart trains) and the tools the
install provides. A block that needs what CI cannot have (a real base's weights, a GPU, a cluster)
carries ``<!-- not run in CI: reason -->`` on the line before its fence; it is left out, and its
reason is printed. docs/fleet.md's *Ray Serve* section (a real base's weights, a cluster) and its real-machines
block are not run: tests/test_ray_serve.py, test_ray_fleet.py and test_fleet_servers.py cover them.

The blocks run under ``set -euo pipefail``: the first command that fails ends the run, and the test
fails naming its block. A server a block starts in the background (``medlego serve … &``) is stopped
by the README's own ``kill $SERVER``; whatever is left when the run ends is killed with its process group.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*not run in CI:\s*(.+?)\s*-->$")
RUN_LANGS = ("bash", "sh", "shell", "python")
# the documents whose blocks run, in this order, and which of their ## sections (None: all of them)
DOCUMENTS = ((README, ("Two-minute quickstart", "Serving in one minute")), (ROOT / "docs" / "serving.md", None),
             (ROOT / "docs" / "fleet.md", ("A fleet",)))
PORTS = (8000, 50051)  # what the README's examples use, as a user types them
DEMO_ANSWER = re.compile(r"^answer \(HTTP 200\): (?:top label: (?P<top>.+); true label: (?P<truth>.+)"
                         r"|labels above 0\.5: (?P<found>.+); true labels: (?P<present>.+)) \[(?P<mark>right|wrong)\]$",
                         re.M)
DEMO_SCORE = re.compile(r"^  (?P<adapter>\S+) on '(?P<task>\S+)': (?:label-wise )?accuracy (?P<acc>[0-9.]+).*\n"
                        r"    \$ (?P<cmd>medlego eval .*)$", re.M)


@dataclass
class Block:
    path: Path  # the document
    line: int  # of the opening fence, 1-based
    lang: str
    heading: str
    text: str
    skip: str | None  # the marker's reason


def readme_blocks(path: Path = README) -> list[Block]:
    """Every fenced block of a document with its ## / ### heading and its not-run marker, if any."""
    blocks, h2, h3, fence, prev = [], "", "", None, ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                blocks.append(Block(path, fence[0], fence[1], f"{h2} / {h3}" if h3 else h2, "\n".join(fence[2]),
                                    fence[3]))
                fence = None
            else:
                fence[2].append(line)
            continue
        if line.startswith("```"):
            m = MARKER.match(prev.strip())
            fence = (n, line[3:].strip(), [], m.group(1) if m else None)
        elif line.startswith("## "):
            h2, h3 = line[3:].strip(), ""
        elif line.startswith("### "):
            h3 = line[4:].strip()
        if line.strip():
            prev = line
    assert fence is None, f"{path.name}: the block opened on line {fence[0]} is never closed"
    return blocks


def selected() -> tuple[list[Block], list[tuple[Block, str]]]:
    """(the blocks to run, in order; the blocks left out with their reasons)."""
    run, left_out = [], []
    for path, sections in DOCUMENTS:
        for b in readme_blocks(path):
            if (sections is not None and b.heading.partition(" / ")[0] not in sections) or b.lang not in RUN_LANGS:
                continue
            (left_out.append((b, b.skip)) if b.skip else run.append(b))
    return run, left_out


def setup_commands() -> str:
    """The set-up block that is not the tests' own: `pip install -e … && medlego demo`, less the install
    (this test runs in that install)."""
    for b in readme_blocks():
        if b.heading.startswith("Set-up") and "medlego demo" in b.text:
            install, _, rest = b.text.strip().partition("&&")
            assert install.strip().startswith("pip install -e"), b.text
            return rest.strip()
    raise AssertionError("README.md's Set-up has no `… && medlego demo` block")


def _script(blocks: list[Block], work: Path) -> str:
    parts = ["set -euo pipefail",
             'trap \'echo "@@ FAILED: block $BLOCK, line $LINENO of the script: $BASH_COMMAND (exit $?)" >&2\' ERR',
             # a failed block leaves the server it started: stop it, so that the run ends now
             "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for i, b in enumerate(blocks, 1):
        parts.append(f"BLOCK={shlex.quote(f'{i} ({b.path.relative_to(ROOT)} line {b.line}, {b.heading})')}")
        parts.append(f'echo "@@ block $BLOCK"')
        if b.lang == "python":
            code = work.parent / f"block{i}.py"
            code.write_text(b.text + "\n")
            parts.append(f"{sys.executable} {code}")
        else:
            parts.append(b.text)
    parts.append('echo "@@ all blocks ran"')
    return "\n".join(parts) + "\n"


def _private_network() -> list[str]:
    """A command prefix that runs its command in a network namespace of its own (a loopback of its own, so
    the README's fixed ports 8000 and 50051 never meet another process's), or [] where the machine
    cannot make one (then those ports must be free here)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return []
    for flags in (["--net"], ["--map-root-user", "--net"]):  # as root; else in a user namespace
        prefix = ["unshare", *flags, "bash", "-c", 'ip link set lo up && exec bash -c "$1"', "readme"]
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    return []


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run(command: str, cwd: Path, timeout: float, prefix: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("MEDLEGO_ADMIN_TOKEN", "MEDLEGO_API_TOKEN", "MEDLEGO_CONFIG", "MEDLEGO_DATA_DIR", "MEDLEGO_DEBUG"):
        env.pop(name, None)  # a fresh shell: only what the blocks set
    t0 = time.perf_counter()
    proc = subprocess.Popen([*(prefix or ["bash", "-c"]), command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n@@ timed out after {timeout:.0f} s"
    finally:
        try:  # a server the blocks left running (a block failed before the README stops it)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out, time.perf_counter() - t0


def test_readme_has_blocks_to_run_and_marks_the_rest():
    run, left_out = selected()
    headings = {(b.path.name, b.heading.partition(" / ")[0]) for b in run}
    assert ("README.md", "Two-minute quickstart") in headings and ("README.md", "Serving in one minute") in headings
    for sub in ("Start a server", "REST", "gRPC", "Open Inference Protocol (KServe v2)"):
        assert ("serving.md", sub) in headings, sub
    assert ("fleet.md", "A fleet") in headings and "medlego dev-fleet" in "\n".join(b.text for b in run)
    text = "\n".join(b.text for b in run)
    assert "grpcurl" not in text, "README examples use only what the install provides: medlego client"
    assert "medlego samples -o" in text and "medlego client" in text and "kill $SERVER && wait $SERVER" in text
    for b, reason in left_out:
        print(f"not run: {b.path.name} line {b.line} ({b.heading}): {reason}")


@pytest.mark.timeout(2700)  # ~4 min on an idle 2-core machine; the demo's training is much slower on a shared one
def test_readme_blocks_run_as_written(tmp_path):
    network = _private_network()
    if not network:
        busy = [p for p in PORTS if not _port_free(p)]
        assert not busy, f"ports {busy} are in use on this machine; the README's examples serve on them"
    run, left_out = selected()
    for b, reason in left_out:
        print(f"not run: {b.path.name} line {b.line} ({b.heading}): {reason}")
    work = tmp_path / "fresh"
    work.mkdir()

    # the set-up's `medlego demo`, first run in this folder
    rc, out, demo_s = _run(setup_commands(), work, timeout=1500, prefix=network)
    print(f"set-up `{setup_commands()}`: {demo_s:.0f} s (first run)")
    assert rc == 0, out
    assert "\r" not in out, "progress output in a pipe must not use carriage returns"
    answers = list(DEMO_ANSWER.finditer(out))
    assert len(answers) == 9, out  # a seeded sample of 3 test images each: PNGs to blood, JPEGs and DICOMs to generalist
    for a in answers:  # each answer is marked right exactly when it agrees with the true label printed beside it
        agrees = a["top"] == a["truth"] if a["top"] is not None else a["found"] == a["present"]
        assert (a["mark"] == "right") == agrees, a.group(0)
    scores = list(DEMO_SCORE.finditer(out))
    assert len(scores) == 6, out  # three specialists, the generalist on each of its three tasks
    for m in scores[-1:]:  # the printed held-out accuracy is `medlego eval`'s, run as the demo prints it
        rc, ev, _ = _run(m["cmd"] + " --json", work, timeout=300, prefix=network)
        assert rc == 0, ev
        assert f"{json.loads(ev.strip().splitlines()[-1])['accuracy']:.4f}" == m["acc"], (m.group(0), ev)
    assert "generalist@1 (blood+derma+chest)" in out and out.count("request:\n  medlego client diagnose") == 9
    for name in ("blood.png", "derma.jpg", "chest.dcm"):  # what the serving examples send
        assert (work / "medlego-demo" / "samples" / name).is_file(), name

    # then every selected block, in order, in one shell
    rc, out, blocks_s = _run(_script(run, work), work, timeout=900, prefix=network)
    print(f"{len(run)} blocks of README.md, docs/serving.md and docs/fleet.md: {blocks_s:.0f} s")
    failed = re.search(r"^@@ FAILED: .*$", out, re.M)
    assert rc == 0 and "@@ all blocks ran" in out, (failed.group(0) if failed else f"exit {rc}") + "\n" + out[-6000:]
    assert "\r" not in out, "progress output in a pipe must not use carriage returns"
    assert not re.search(r"^Traceback", out, re.M), out


def test_ci_runs_the_readmes_test_command():
    """`.ci/run` runs the README's set-up test command, word for word (python3 for python)."""
    blocks = [b.text.strip() for b in readme_blocks() if b.heading.startswith("Set-up") and "pytest" in b.text]
    assert len(blocks) == 1, blocks
    command = blocks[0].replace("pip install", "python3 -m pip install -q").replace("python -m pytest", "python3 -m pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert command in ci.splitlines(), (command, ci)
