"""`medlego merge --tune-on`: the grid is searched on validation data, and the grid and the choice are recorded."""

import pytest

from medlego.cli import main
from medlego.jobs.synthetic import make_synthetic_medmnist
from medlego.runtime.adapter import load_adapter, save_adapter
from medlego.runtime.adapter_merge import method

from conftest import TINY_MODEL


@pytest.fixture(scope="module")
def tune_inputs(tmp_path_factory, tiny_base):
    """Two 3-class adapters (tasks task1, task2) and a small dataset for each (only val is used)."""
    from medlego.jobs.synthetic import random_adapter

    root = tmp_path_factory.mktemp("tune")
    paths, data = [], []
    for seed in (1, 2):
        p = root / f"a{seed}.safetensors"
        save_adapter(random_adapter(tiny_base.spec, tiny_base.preprocess, seed=seed, rank=2), p)
        paths.append(str(p))
        data.append(make_synthetic_medmnist(root / f"d{seed}.npz", classes=3, n_train=3, n_val=12, n_test=3, seed=seed))
    return root, paths, [f"task{s}={d}" for s, d in zip((1, 2), data)]


def test_tune_on_records_the_grid_and_the_choice(tune_inputs, tiny_base_file):
    root, paths, tune_on = tune_inputs
    out = root / "tsv.safetensors"
    assert main(["merge", "--method", "tsv", "-o", str(out), *paths, "--tune-on", *tune_on,
                 "--model", TINY_MODEL, "--base-weights", str(tiny_base_file), "--no-report"]) == 0
    prov = load_adapter(out).provenance
    rec = prov["tuning"]
    assert rec["grid"] == {"alpha": list(method("tsv").grid["alpha"])}
    assert [t["params"]["alpha"] for t in rec["trials"]] == rec["grid"]["alpha"]
    best = max(rec["trials"], key=lambda t: t["score"])
    assert rec["chosen"] == best["params"] and prov["parameters"]["alpha"] == best["params"]["alpha"]
    for trial in rec["trials"]:  # the score is the mean of merged ÷ source on validation
        ratios = [trial["per_task"][t] / rec["tasks"][t]["source_metric"] for t in ("task1", "task2")]
        assert trial["score"] == pytest.approx(sum(ratios) / 2, abs=1e-5)
    assert rec["tasks"]["task1"]["val_images"] == 12 and rec["tasks"]["task1"]["file"].endswith("d1.npz")


def test_tune_on_keeps_given_parameters_fixed(tune_inputs, tiny_base_file):
    root, paths, tune_on = tune_inputs
    out = root / "ties.safetensors"
    assert main(["merge", "--method", "ties", "--density", "0.5", "-o", str(out), *paths, "--tune-on", *tune_on,
                 "--model", TINY_MODEL, "--base-weights", str(tiny_base_file), "--no-report"]) == 0
    prov = load_adapter(out).provenance
    assert prov["tuning"]["fixed"] == {"density": 0.5} and list(prov["tuning"]["grid"]) == ["scale"]
    assert prov["parameters"]["density"] == 0.5 and prov["parameters"]["scale"] == prov["tuning"]["chosen"]["scale"]


@pytest.mark.parametrize("extra, message", [
    (["--method", "delta-avg"], "has no α, λ, density or threshold to tune"),
    (["--method", "iso-c", "--alpha", "2"], "every tunable parameter of 'iso-c'"),
    (["--method", "iso-c", "--no-base"], "pass the base with --model NAME --base-weights FILE"),
    (["--method", "iso-c", "--bad-task"], "--tune-on task 'nope' is not a task of the sources"),
])
def test_tune_on_refusals_are_one_line(tune_inputs, tiny_base_file, capsys, extra, message):
    root, paths, tune_on = tune_inputs
    base = [] if "--no-base" in extra else ["--model", TINY_MODEL, "--base-weights", str(tiny_base_file)]
    tune_on = [f"nope={tune_on[0].split('=')[1]}"] if "--bad-task" in extra else tune_on
    flags = [x for x in extra if x not in ("--no-base", "--bad-task")]
    assert main(["merge", *flags, "-o", str(root / "x.safetensors"), *paths, "--tune-on", *tune_on, *base]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
