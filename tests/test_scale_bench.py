"""`python -m medlego.benchmarks.scale_bench --quick`: the whole scale benchmark at tiny sizes (real
PostgreSQL and S3 servers), so the module cannot rot between its full runs."""

from __future__ import annotations

import json


def test_scale_bench_quick(tmp_path):
    from medlego.benchmarks import scale_bench

    result = scale_bench.main(["--quick", "--adapters", "24", "--requests", "32", "--warmup", "8", "--cold", "4",
                               "--resolves", "40", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "scale_bench.json").read_text())["config"]["adapters"] == 24
    assert "| uniform |" in (tmp_path / "scale_bench.md").read_text()
    assert [m["mix"] for m in result["mixes"]] == ["one", "zipf", "uniform", "one"]
    assert all(m["errors"] == 0 and m["latency"]["n"] == 32 for m in result["mixes"])
    assert result["list"]["versions_walked"] == 24 and result["cold_s3"]["tiers"] == ["store"]
    assert result["cold_node"]["tiers"] == ["node"]
    uniform = next(m for m in result["mixes"] if m["mix"] == "uniform")["tiers"]
    assert uniform["host"]["misses"] > 0 and uniform["node"]["hits"] + uniform["store"]["hits"] == uniform["host"]["misses"]
