"""`verify` of a large audit log: time and peak memory (issue 25: under 100 MB, at least 100k rows/s).

Builds an N-row SQLite audit log (default 10 M) with a valid hash chain by bulk insert (realistic
diagnosis bodies: caller, adapter, image sha256, request id, probabilities), then runs
``medlego.runtime.registry.audit.verify`` in a fresh process and reports its wall time, rows/s and
peak RSS, and the RSS of that process before verify started (imports), so the difference is what
verify itself holds. Writes audit_verify.{json,md} into --out (default ./medlego-results).

    python -m medlego.benchmarks.audit_verify --rows 10000000 [--db /tmp/audit.db] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medlego.benchmarks.common import OUT_HELP, results_dir

_VERIFY = """
import json, resource, sys, time
from pathlib import Path
from medlego.runtime.registry.audit import verify
from medlego.runtime.registry.index import open_index
index = open_index(None, Path(sys.argv[1]))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
try:  # reset the peak (VmHWM) to the current RSS: the imports' own peak must not hide verify's
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = status("VmRSS")
t0 = time.perf_counter()
r = verify(index)
dt = time.perf_counter() - t0
print(json.dumps({"ok": r.ok, "rows": r.rows, "problem": r.problem, "seconds": dt,
                  "rss_before_kb": before, "peak_rss_kb": status("VmHWM")}))
"""


def build(path: Path, rows: int, chunk: int = 50000) -> float:
    """Write `rows` chained rows into the audit table of `path`/registry.db; seconds taken."""
    from medlego.runtime.registry.audit import GENESIS, columns_of, ensure_schema
    from medlego.runtime.registry.index import open_index

    ensure_schema(open_index(None, path))
    db = sqlite3.connect(path / "registry.db", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    t0 = time.perf_counter()
    prev, seq, sha = GENESIS, 0, hashlib.sha256
    dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode
    labels = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    while seq < rows:
        batch = []
        for _ in range(min(chunk, rows - seq)):
            seq += 1
            body = {"time": f"2025-01-{1 + seq % 28:02d}T{seq % 24:02d}:{seq % 60:02d}:{seq % 60:02d}.{seq % 1000000:06d}Z",
                    "kind": "diagnosis", "caller": f"caller{seq % 17}", "api": "rest", "adapter": f"derma@{1 + seq % 3}",
                    "adapter_sha256": "%064x" % (seq % 3), "request_id": "%032x" % seq,
                    "image_sha256": "%064x" % seq, "image_format": "png", "image_bytes": 20000 + seq % 997,
                    "requested": "derma", "task": "skin", "latency_ms": 12.5, "outcome": "ok",
                    "top_label": labels[seq % 7], "top_probability": 0.5,
                    "probabilities": {lab: round(1 / 7, 6) for lab in labels}}
            text = dumps(body)
            h = sha(f"{prev}\n{seq}\n{text}".encode()).hexdigest()
            batch.append((seq, *columns_of(body), text, prev, h))
            prev = h
        db.execute("BEGIN")
        db.executemany("INSERT INTO audit (seq, time, kind, caller, adapter, image_sha256, body, prev, hash) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
        db.execute("COMMIT")
    db.close()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--db", metavar="DIR", help="folder of the registry.db to build (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the built database")
    ap.add_argument("--note", default="", help="a sentence added to the .md (e.g. why fewer rows than 10 M)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    args = ap.parse_args(argv)
    folder = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="medlego-audit-verify-"))
    folder.mkdir(parents=True, exist_ok=True)
    existing = sqlite3.connect(folder / "registry.db").execute(
        "SELECT name FROM sqlite_master WHERE name = 'audit'").fetchall()
    have = sqlite3.connect(folder / "registry.db").execute("SELECT COUNT(*) FROM audit").fetchone()[0] if existing else 0
    build_s = None
    if have != args.rows:
        if have:
            sqlite3.connect(folder / "registry.db").execute("DROP TABLE audit")
        build_s = build(folder, args.rows)
        print(f"built {args.rows} rows in {build_s:.1f}s", file=sys.stderr)
    out = subprocess.run([sys.executable, "-c", _VERIFY, str(folder)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    db_bytes = sum(p.stat().st_size for p in folder.glob("registry.db*"))
    result = {"rows": r["rows"], "ok": r["ok"], "verify_seconds": round(r["seconds"], 2),
              "rows_per_second": round(r["rows"] / r["seconds"]), "note": args.note, "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 1),
              "rss_before_verify_mb": round(r["rss_before_kb"] / 1024, 1),
              "verify_rss_growth_mb": round((r["peak_rss_kb"] - r["rss_before_kb"]) / 1024, 1),
              "db_mb": round(db_bytes / 2**20), "build_seconds": round(build_s, 1) if build_s else None,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version()}
    if not args.keep and not args.db:
        for p in folder.glob("registry.db*"):
            p.unlink()
        folder.rmdir()
    d = args.out or results_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "audit_verify.json").write_text(json.dumps(result, indent=2) + "\n")
    (d / "audit_verify.md").write_text(
        f"# `medlego audit verify` on {result['rows']:,} rows (SQLite)\n\n"
        f"| rows | verify s | rows/s | peak RSS MB | RSS before verify MB | growth MB | database MB |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {result['rows']:,} | {result['verify_seconds']} | {result['rows_per_second']:,} | {result['peak_rss_mb']} | "
        f"{result['rss_before_verify_mb']} | {result['verify_rss_growth_mb']} | {result['db_mb']} |\n\n"
        f"Streaming verify reads keyset pages of 20,000 rows: memory does not grow with the log. The RSS before "
        f"verify is the process's imports (the package's config module imports torch). Machine: {result['machine']} "
        f"(shared with other work while measured), Python {result['python']}. Built with "
        f"`python -m medlego.benchmarks.audit_verify --rows {result['rows']}`.\n"
        + (f"\n{args.note}\n" if args.note else ""))
    print(json.dumps(result))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
