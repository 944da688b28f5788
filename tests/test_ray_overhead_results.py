"""ray_overhead's results file keeps one run per label, so a before/after pair run from two
checkouts ends in one table (issue 29)."""

import json

from medlego.benchmarks import ray_overhead


def _row(size: str, fixed: float) -> dict:
    light = {"p50_ms": 30.0, "p99_ms": 40.0, "load_avg": 1.0, "stages_ms": {"total": 20.0}}
    return {"size": size, "img_size": 32, "embedded_light": light, "ray_light": {**light, "p50_ms": 30.0 + fixed},
            "fixed_cost_ms": fixed, "ray_hops_ms": {}, "throughput_ratio": 0.8, "normalized_ratio": 0.8,
            "embedded_img_s": [10.0], "ray_img_s": [8.0], "round_loads": [1.0], "errors": 0, "command": "x"}


def test_runs_of_other_labels_are_kept_and_the_same_label_replaced(tmp_path):
    path = tmp_path / "ray_overhead.json"
    assert [r["label"] for r in ray_overhead.merge_runs(path, "before", [_row("tiny", 9.0)])] == ["before"]
    path.write_text(json.dumps({"sizes": ray_overhead.merge_runs(path, "before", [_row("tiny", 9.0)])}))
    table = ray_overhead.merge_runs(path, "after", [_row("tiny", 3.0), _row("224", 11.0)])
    assert [(r["label"], r["size"], r["fixed_cost_ms"]) for r in table] == \
        [("before", "tiny", 9.0), ("after", "tiny", 3.0), ("after", "224", 11.0)]
    path.write_text(json.dumps({"sizes": table}))
    again = ray_overhead.merge_runs(path, "after", [_row("tiny", 4.0)])  # a re-run replaces its own label only
    assert [(r["label"], r["fixed_cost_ms"]) for r in again] == [("before", 9.0), ("after", 4.0)]
    md = ray_overhead.markdown(again, "cmd")
    assert "| before | tiny (32 px) |" in md and "| after | tiny (32 px) |" in md


def test_fixed_cost_is_the_time_outside_the_engine_not_the_p50_difference():
    # the run where the embedded server's inference was 6 ms slower than the replica's: the p50s differ
    # by 3.5 ms, but a request spent 10.6 ms more outside the engine through Ray
    embedded = {"outside_server": 3.1, "inference": 21.4, "total": 29.4}
    ray = {"outside_server": 13.7, "inference": 15.0, "total": 22.2}
    assert ray_overhead.outside_engine_cost(embedded, ray) == 10.6
    assert ray_overhead.outside_engine_cost({}, ray) is None  # an old report without the stage: unknown, not 0
