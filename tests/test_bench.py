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
            "switch per request", "PEFT mixed batch (adapter_names)", "ONNX Runtime: one folded adapter"} <= methods
    for per in r["throughput"].values():
        assert all(v["images_per_s"] > 0 for v in per.values())
    from medlego.benchmarks.bench import cpu_has_bf16

    paired = [g for g in r["goals"] if "paired" in g]
    assert len(paired) == (2 if cpu_has_bf16() else 1)
    assert "ONNX Runtime" in paired[0]["what"] and "bfloat16" not in paired[0]["what"]  # float32 first
    assert all("bfloat16" in g["what"] for g in paired[1:])
    for g in paired:
        assert g["paired"]["rounds"] == 2  # --quick: two interleaved rounds
        assert g["paired"]["min"] <= g["ratio"] <= g["paired"]["max"]
    if cpu_has_bf16():  # the bfloat16 run answers the same labels, its probabilities close to float32's
        ag = r["bf16_agreement"]
        assert 0 < ag["max_abs_probability_diff"] < 0.05 and ag["top1_agreement"] >= 0.75, ag
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


def test_paired_ratio_pairs_rounds_not_bests():
    from medlego.benchmarks.bench import paired_ratio

    # the engine is faster in rounds 1 and 3 and slower in round 2; the best-of comparison alone
    # (0.9 s vs 1.0 s) would hide the round it lost
    pr = paired_ratio([1.0, 1.0, 2.0], [0.9, 1.25, 1.6])
    assert pr["rounds"] == 3 and pr["ahead"] == 2
    assert abs(pr["median"] - 1.0 / 0.9) < 1e-9 and abs(pr["min"] - 0.8) < 1e-9 and abs(pr["max"] - 1.25) < 1e-9


def test_compiled_trunk_benchmark_checks_and_writes(tmp_path):
    """The compiled-trunk comparison (issue 30) on a tiny model: the compiled adapted trunk equals the
    eager one, and every method has its paired ratio against ONNX Runtime (ORT's own is exactly 1)."""
    from medlego.benchmarks import compiled_trunk

    assert compiled_trunk.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2",
                                "--rounds", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "compiled_trunk.json").read_text())
    assert r["compiled_max_abs_diff"] < 1e-3 and r["plain_linears_max_abs_diff"] < 1e-3
    assert set(r["methods"]) == {"trunk alone, eager", "trunk alone, torch.compile", "mixed batch, eager",
                                 "mixed batch, torch.compile", compiled_trunk.ORT,
                                 "trunk alone, eager" + compiled_trunk.PLAIN,
                                 "mixed batch, eager" + compiled_trunk.PLAIN}
    assert r["methods"][compiled_trunk.ORT]["vs_ort"]["ratios"] == [1.0, 1.0]
    assert all(m["images_per_s_best"] > 0 and m["vs_ort"]["rounds"] == 2 for m in r["methods"].values())
    assert "| mixed batch, torch.compile |" in (tmp_path / "compiled_trunk.md").read_text()
