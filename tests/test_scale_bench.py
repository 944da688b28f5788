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
    assert [(m["mix"], m["node"]) for m in result["mixes"]] == [
        ("one", "-"), ("zipf", "cold"), ("uniform", "cold"), ("one", "-"), ("zipf", "warm"), ("uniform", "warm"),
        ("one", "-")]
    assert all(m["errors"] == 0 and m["latency"]["n"] == 32 for m in result["mixes"])
    assert result["list"]["versions_walked"] == 24 and result["cold_s3"]["tiers"] == ["store"]
    assert result["cold_node"]["tiers"] == ["node"]
    for mix in result["mixes"][1:3]:  # cold: host misses go to the node cache or to S3
        t = mix["tiers"]
        assert t["host"]["misses"] > 0 and t["node"]["hits"] + t["store"]["hits"] == t["host"]["misses"]
    warm = result["warm"]
    assert warm["versions"] == 24 and warm["fetched"] + warm["cached"] == 24 and warm["left_out"] == 0
    for mix in result["mixes"][4:6]:  # warm: every host miss is read from the node cache, none downloaded
        t = mix["tiers"]
        assert t["host"]["misses"] > 0 and t["node"]["hits"] == t["host"]["misses"] and t["store"]["hits"] == 0
    ref = result["mixes"][5]["reference"]
    assert abs(result["ratios"]["uniform"]["warm"] - result["mixes"][5]["images_per_s"] / ref["mean"]) < 2e-3
