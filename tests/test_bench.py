"""`medlego bench --quick` runs end to end on the CPU and writes every file with finite numbers."""

import json

from medlego.benchmarks.bench import all_finite
from medlego.cli import main


def test_bench_quick_writes_all_files(tmp_path):
    assert main(["bench", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert all_finite(r)
    for section in ("throughput", "cold_load", "memory", "scale", "merge", "goals"):
        assert r[section], section
    methods = set(r["throughput"])
    assert {"base alone", "engine: one adapter", "engine: all-distinct adapters", "engine: merged adapter",
            "switch per request", "PEFT mixed batch (adapter_names)"} <= methods
    for per in r["throughput"].values():
        assert all(v["images_per_s"] > 0 for v in per.values())
    assert r["cold_load"]["cold_to_ready"]["p50_ms"] > 0 and r["memory"]["bytes_per_slot"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| issue | what | measured | goal | met |" in md and "PEFT mixed batch" in md
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmarks_never_write_the_committed_results_by_default(tmp_path, monkeypatch):
    """Issue 27: with no --out a benchmark writes ./medlego-results in the current folder, even when that
    folder is the checkout; the committed benchmarks/results is replaced only by an explicit --out."""
    import hashlib
    from pathlib import Path

    from medlego.benchmarks import common, merge_speed
    from medlego.cli import build_parser

    repo = Path(__file__).resolve().parents[1]
    committed = repo / "benchmarks" / "results"
    monkeypatch.chdir(repo)
    assert common.results_dir() == repo / "medlego-results"
    assert build_parser("bench").parse_args(["bench", "--quick"]).out is None  # resolved when run, in its folder
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in committed.iterdir() if p.is_file()}
    monkeypatch.chdir(tmp_path)
    assert merge_speed.main(["--sources", "2", "--dim", "16", "--depth", "1", "--rank", "2"]) == 0
    assert (tmp_path / "medlego-results" / "merge_speed.json").is_file()
    assert (tmp_path / "medlego-results" / "merge_speed.md").is_file()
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in committed.iterdir() if p.is_file()}
    assert before == after
