"""The device check of the engine (benchmarks/gpu_correctness.py) runs its own logic on the CPU:
the oracle (folded fp32 weights) agrees with the engine, and a wrong engine would be caught."""

import torch

from medlego.benchmarks import gpu_correctness


def test_engine_matches_folded_weights_and_the_check_can_fail(monkeypatch):
    res = gpu_correctness.run("cpu", "vit_tiny_patch16_224", 32, 3, 2, ["split"], ["float32"], [False], 0.5)
    assert res["ok"] and [r["kernel"] for r in res["rows"]] == ["split"]
    assert all(r["max_error"] < 1e-4 and r["adapter_effect"] > 0.05 for r in res["rows"])
    assert "| float32 | split | off |" in gpu_correctness.to_markdown(res)

    # an engine whose low-rank terms are off by a factor of two must fail the check
    from medlego.kernels import reference

    real = reference.qkv_lora_reference

    def doubled(x, weight, bias, a, e, b, plan):
        return real(x, weight, bias, a, e * 2, b, plan)

    monkeypatch.setattr("medlego.runtime.kernel_choice.qkv_lora_reference", doubled)
    monkeypatch.setattr("medlego.runtime.kernel_choice.get_qkv_impl", lambda name: doubled)
    bad = gpu_correctness.run("cpu", "vit_tiny_patch16_224", 32, 3, 2, ["torch"], ["float32"], [False], 0.5)
    assert not bad["ok"] and bad["rows"][0]["max_error"] > 1e-3
    assert torch.isfinite(torch.tensor(bad["rows"][0]["max_error"]))


def test_the_device_check_script_parses_and_names_its_steps():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert r.returncode != 0 and "usage: gpu_check.sh OUT_DIR" in r.stderr
    text = script.read_text()
    for module in ("medlego.benchmarks.gpu_correctness", "medlego.benchmarks.kernel_bench", "tests/test_kernel.py"):
        assert module in text
