"""The hostile senders of tests/test_decode_burst.py, in a process of their own: the test process
probes /healthz, and a prober that shared an interpreter lock with the senders would be measuring
its own threads, not the server.

    python tests/burst_sender.py URL FILES_DIR SENDERS ROUNDS OUT_JSON TOKEN

Each of SENDERS threads posts every file in FILES_DIR (sorted by name) ROUNDS times to
/v1/diagnose with TOKEN as its bearer token; OUT_JSON gets [[file name, status, detail], ...].
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import httpx


def main(url: str, files_dir: str, senders: int, rounds: int, out: str, token: str) -> None:
    files = {p.name: p.read_bytes() for p in sorted(Path(files_dir).iterdir())}
    answers: list[tuple[str, int, str]] = []

    def sender():
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
            for _ in range(rounds):
                for name, data in files.items():
                    r = c.post("/v1/diagnose", files={"file": ("x.dcm", data)}, data={"adapter": "b0"})
                    answers.append((name, r.status_code, r.json().get("detail", "") if r.status_code >= 400 else ""))

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps(answers))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
