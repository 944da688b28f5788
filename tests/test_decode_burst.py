"""A burst of hostile DICOM files at a real server (issue 24 items 1 and 6): each is refused with a
4xx and a reason, the server's memory stays bounded, and meanwhile another caller's diagnosis is
answered within a bound (the decode pool takes turns between callers) and /healthz in under 100 ms
at every probe.

The server is a `medlego serve` process of its own, probed from outside as an attacker and a client
would: the test's sender threads must not share the server's interpreter lock, or the harness would
be measuring itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from hashlib import sha256
from pathlib import Path

import httpx
import pytest

import hostile_dicom as hostile
from backends import free_port
from conftest import TINY_MODEL
from medlego.jobs.synthetic import encode_png, random_image
from servers import seeded_registry, wait_ready

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PNG = encode_png(random_image(4, 32))
SENDERS = 12  # more than the decode workers: the attacker always has tasks waiting
ROUNDS = 2
ATTACKER, CLINIC = "attacker-token-1", "clinic-token-2"  # two callers: the decode pool takes turns between them


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hostile_files() -> dict[str, bytes]:
    return {
        "jpeg-fragment": hostile.jpeg_fragment_bomb(13000),
        "j2k-fragment": hostile.j2k_fragment_bomb(13000),
        "rle-bomb": hostile.rle_bomb(64, 64, 4),
        "header-flood": hostile.header_flood(200_000),
        "deflated-flood": hostile.header_flood(1_000_000, deflated=True),
        "sequence-flood": hostile.sequence_flood(200_000),
    }


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # peak RSS := RSS now (Linux >= 4.0)


def burst(url: str, files: dict[str, bytes], work: Path) -> dict:
    """SENDERS threads of another process send every hostile file ROUNDS times while one normal client
    diagnoses and probes /healthz in a loop; the answers and the normal client's latencies."""
    (work / "files").mkdir()
    for name, data in files.items():
        (work / "files" / name).write_bytes(data)
    out = work / "answers.json"
    senders = subprocess.Popen([sys.executable, str(Path(__file__).with_name("burst_sender.py")), url,
                                str(work / "files"), str(SENDERS), str(ROUNDS), str(out), ATTACKER])
    diagnose_s, healthz_s, probe_errors = [], [], []

    def probe():  # a liveness probe every 20 ms for as long as the burst lasts
        with httpx.Client(base_url=url, timeout=120) as c:
            while senders.poll() is None:
                t0 = time.perf_counter()
                status = c.get("/healthz").status_code
                healthz_s.append(time.perf_counter() - t0)
                if status != 200:
                    probe_errors.append(status)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    with httpx.Client(base_url=url, timeout=120, headers=bearer(CLINIC)) as c:
        while senders.poll() is None:
            t0 = time.perf_counter()
            r = c.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "b0"})
            diagnose_s.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            time.sleep(0.02)
    prober.join()
    assert senders.returncode == 0 and not probe_errors, probe_errors
    return {"answers": [tuple(a) for a in json.loads(out.read_text())], "diagnose_s": diagnose_s, "healthz_s": healthz_s}


def _refusal_times(url: str, files: dict[str, bytes]) -> dict[str, float]:
    """Seconds the server takes to refuse each hostile file with nothing else running: this machine's speed."""
    times = {}
    with httpx.Client(base_url=url, timeout=120, headers=bearer(ATTACKER)) as c:
        for name, data in files.items():
            t0 = time.perf_counter()
            c.post("/v1/diagnose", files={"file": (name + ".dcm", data)}, data={"adapter": "b0"})
            times[name] = time.perf_counter() - t0
    return times


def test_a_burst_of_hostile_dicom_delays_no_one(tmp_path, tiny_base, tiny_base_file):
    data = seeded_registry(tmp_path / "data", tiny_base, ["b0"], 40)
    config = tmp_path / "serve.toml"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("".join(f'[[token]]\nname = "{name}"\nrole = "diagnose"\nsha256 = "{sha256(token.encode()).hexdigest()}"\n'
                              for name, token in (("attacker", ATTACKER), ("clinic", CLINIC))))
    config.write_text(f"[engine]\nslots = 8\n[batching]\nmax_batch = 16\nmax_wait_ms = 3\n"
                      f"[auth]\ntokens_file = \"{tokens}\"\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medlego", "serve", "--model", TINY_MODEL, "--weights",
                             str(tiny_base_file), "--data-dir", str(data), "--port", str(port), "--no-grpc",
                             "--config", str(config), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    files = hostile_files()
    try:
        wait_ready(url, proc, timeout=120)
        with httpx.Client(base_url=url, timeout=60, headers=bearer(CLINIC)) as c:  # warm: every decoder, the batch path
            for _ in range(3):
                assert c.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "b0"}).status_code == 200
            assert c.post("/v1/diagnose", files={"file": ("x.dcm", hostile.jpeg_dicom())},
                          data={"adapter": "b0"}).status_code == 200
        alone = _refusal_times(url, files)
        _reset_peak_rss(proc.pid)
        base = _peak_rss(proc.pid)
        t0 = time.perf_counter()
        result = burst(url, files, tmp_path)
        took = time.perf_counter() - t0
        growth = _peak_rss(proc.pid) - base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    answers, diagnose_s, healthz_s = result["answers"], result["diagnose_s"], result["healthz_s"]
    print(f"\n{len(answers)} hostile requests in {took:.1f} s; normal diagnose max {max(diagnose_s) * 1000:.0f} ms "
          f"over {len(diagnose_s)}; /healthz max {max(healthz_s) * 1000:.0f} ms over {len(healthz_s)} "
          f"(slowest {sorted(round(s * 1000) for s in healthz_s)[-5:]} ms); peak RSS growth {growth / 2**20:.0f} MB; "
          f"each refused alone: { {k: round(v * 1000) for k, v in alone.items()} } ms")
    assert len(answers) == SENDERS * ROUNDS * len(files)
    for name, status, detail in answers:
        assert status in (400, 413, 422), (name, status, detail)  # never 200, never 503 "retry later"
        assert detail and "\n" not in detail, (name, detail)
    # the decode pool takes turns between callers (serving/fair_pool.py): the clinic's image waits for the
    # decodes already running, not for the attacker's queue. Measured with 12 senders: at most 0.63-0.90 s;
    # in arrival order (one queue for all) 2.0-2.2 s. Before issue 24: 64 s behind 16 fragment bombs.
    # On a slower machine every decode is slower, the clinic's turn too: the bound grows with the time the
    # six files take to be refused one after another, alone (0.87 s on a 2-core Zen 3, where the burst's
    # worst was 1.62-1.63 s: 1.9 such rounds; one queue for all waits for ~12 decodes, 4+ rounds)
    bound = max(1.5, 3.0 * sum(alone.values()))
    assert max(diagnose_s) < bound, (bound, [round(s, 2) for s in diagnose_s])
    # The bound: /healthz under 100 ms at every probe, a probe every 20 ms throughout the burst.
    # It holds because the server's switch interval is 0.5 ms ([server] switch_interval_ms): at CPython's
    # default 5 ms the loop waited that long for each turn back from the decode and parse threads, and
    # probes reached 112-120 ms (measured with this harness, senders in their own process).
    assert len(healthz_s) >= 20 and max(healthz_s) < 0.1, sorted(healthz_s)[-5:]
    assert growth < 256 * 2**20, f"{growth / 2**20:.0f} MB"  # before: about 1 GB per RLE bomb or flood
