"""benchmarks/pretrain_base.py, merge_table_seeds.py and figure2_seeds.py end to end at tiny sizes (seconds): the
files they write and their fields, and that a missing ``--base`` file is rebuilt. The numbers mean nothing here."""

import json

import numpy as np
import pytest
import torch

from medlego.benchmarks import figure2_seeds, merge_table_seeds, merge_tasks, pretrain_base
from medlego.runtime.base import load_base

TINY = ["--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--probe-train", "8", "--probe-val", "4",
        "--probe-test", "4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    assert pretrain_base.main(TINY + ["--weights", str(root / "base.safetensors"), "--out", str(root)]) == 0
    return root


def test_pretrain_writes_weights_and_record(pretrained):
    r = json.loads((pretrained / "pretrain_base.json").read_text())
    assert r["recipe"]["steps"] == 2 and r["corpus"]["images_seen"] == 8 and len(r["history"]) == 1
    assert set(r["probes"]) == {t.name for t in merge_tasks.TASKS}
    for p in r["probes"].values():
        assert {"test_accuracy", "val_accuracy", "chance", "margin_over_chance", "l2"} <= set(p)
    assert len(r["sha256"]) == 64 == len(r["fingerprint"]) and r["train_seconds"] > 0 and r["hardware"]["cpu"]
    md = (pretrained / "pretrain_base.md").read_text()
    assert r["sha256"] in md and "≥ chance + 0.20" in md
    base = load_base("vit_tiny_patch16_224", pretrained / "base.safetensors")  # a timm state_dict the runtime loads
    assert base.input_size == 48


def test_corpus_is_seeded_and_labels_the_dominant_texture():
    a = pretrain_base.corpus_batch(np.random.default_rng(3), 4)
    b = pretrain_base.corpus_batch(np.random.default_rng(3), 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(a) == 3 and a[0].shape == (4, 3, 48, 48) and int(a[1].max()) < len(pretrain_base.TEXTURES)
    for label, cells in zip(a[1], a[2]):  # the label is the dominant cell class (4–6 of 9 cells), no marked cell
        counts = torch.bincount(cells, minlength=len(pretrain_base.TEXTURES))
        assert int(counts.argmax()) == int(label) and 4 <= int(counts.max()) <= 6 and int(counts.sort().values[-2]) <= 1


def test_missing_base_is_rebuilt(tmp_path):
    recipe = pretrain_base.Recipe(steps=1, batch_size=2, warmup_steps=1, probe_train=4, probe_val=2, probe_test=2)
    path = pretrain_base.ensure_base(tmp_path / "b.safetensors", recipe, log=lambda *_: None)
    assert path.exists()
    stamp = path.stat().st_mtime_ns
    assert pretrain_base.ensure_base(path, recipe, log=lambda *_: None).stat().st_mtime_ns == stamp  # kept


def test_table_and_figure2_over_seeds(pretrained, tmp_path):
    base = ["--base", str(pretrained / "base.safetensors"), "--seeds", "0,4", "--threads", "1",
            "--specialists", str(tmp_path / "spec"), "--out", str(tmp_path), "--val-images", "4", "--test-images", "4"]
    assert merge_table_seeds.main(base + ["--epochs", "1", "--train-images", "8", "--methods", "med-lego,delta-avg,task-arithmetic",
                                          "--compare", str(tmp_path / "none.json")]) == 0
    r = json.loads((tmp_path / "merge_table_pretrained.json").read_text())
    agg = r["aggregate"]
    assert set(agg["defaults"]) == {"med-lego", "delta-avg", "task-arithmetic"} and set(agg["tuned"]) == {"med-lego", "task-arithmetic"}
    assert set(agg["truncation"]) == {f"med-lego (v={v})" for v in merge_table_seeds.THRESHOLDS}
    cell = agg["defaults"]["med-lego"]["normalised_accuracy"]
    assert cell["n"] == 2 and len(cell["values"]) == 2 and cell["sd"] >= 0
    assert (tmp_path / "merge_table_pretrained_seed4.json").exists()
    assert "± " in (tmp_path / "merge_table_pretrained.md").read_text()
    assert figure2_seeds.main(base + ["--source-epochs", "1", "--source-train-images", "8", "--epochs", "2",
                                      "--train-images", "8"]) == 0
    f = json.loads((tmp_path / "figure2_pretrained.json").read_text())
    assert f["seeds"] == [0, 4] and len(f["arms"]) == 5
    for arm in f["arms"].values():
        assert len(arm["runs"]) == 2 and len(arm["val_mean"]) == len(arm["val_sd"]) == 2 and arm["test_sd"] >= 0
    assert (tmp_path / "figure2_pretrained.png").stat().st_size > 0 and "± " in (tmp_path / "figure2_pretrained.md").read_text()


def test_merge_table_base_option_rebuilds_a_missing_base(tmp_path, monkeypatch):
    import functools

    from medlego.benchmarks import merge_table
    from medlego.runtime.adapter import load_adapter

    # the default recipe takes minutes: a missing --base is rebuilt with whatever Recipe() gives
    monkeypatch.setattr(pretrain_base, "Recipe", functools.partial(
        pretrain_base.Recipe, steps=1, batch_size=2, warmup_steps=1, probe_train=4, probe_val=2, probe_test=2))
    weights = tmp_path / "missing.safetensors"
    assert merge_table.main(["--base", str(weights), "--tasks", "lesion-ring", "--specialists", str(tmp_path / "spec"),
                             "--train-only", "--epochs", "1", "--train-images", "8", "--val-images", "4",
                             "--test-images", "4", "--threads", "1"]) == 0
    base = load_base("vit_tiny_patch16_224", weights)
    assert load_adapter(tmp_path / "spec" / "lesion-ring.safetensors", expected_base=base.spec).base.fingerprint == base.spec.fingerprint


def test_committed_results_were_made_with_these_tasks(tmp_path):
    """The committed pretrained merge table's datasets are the ones merge_tasks.TASKS generates today (sha256 of
    each task's arrays): a task redefined without rerunning the results (or lesion-ring's 4 classes reverted to 3,
    whose probe was 0.980 on the pretrained base, pretrain_base.md) fails here."""
    from pathlib import Path

    from medlego.jobs.datasets import load_dataset

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    committed = json.loads((results / "merge_table_pretrained_seed0.json").read_text())["datasets"]
    splits = next(iter(committed.values()))["splits"]
    paths = merge_table_seeds.make_data(tmp_path, train=splits["train"], val=splits["val"], test=splits["test"])
    assert {t: load_dataset(p, input_size=48).fingerprint for t, p in paths.items()} == \
        {t: d["sha256"] for t, d in committed.items()}
    assert {t: d["classes"] for t, d in committed.items()} == {t.name: t.classes for t in merge_tasks.TASKS}
