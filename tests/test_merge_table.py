"""benchmarks/merge_table.py end to end on a few images: reference rows, both blocks, the coordinate search of
two-parameter methods, the saved specialists figure2.py reuses, and the Markdown (numbers meaningless here)."""

import functools

import pytest

from medlego.benchmarks import merge_table, merge_tasks
from medlego.runtime.adapter import load_adapter
from medlego.runtime.adapter_merge import method


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_base):
    """The session's 32-px base (the 48-px images are resized: the numbers mean nothing, the plumbing is tested)."""
    root, base = tmp_path_factory.mktemp("table"), tiny_base
    sets = {t.name: merge_tasks.make_marked_dataset(root / f"{t.name}.npz", t, n_train=8, n_val=4, n_test=4, seed=i)
            for i, t in enumerate(merge_tasks.TASKS)}
    probe = merge_tasks.linear_probe
    with pytest.MonkeyPatch.context() as mp:  # one L2 value: the probe's search is not what is tested here
        mp.setattr(merge_tasks, "linear_probe", functools.partial(probe, l2_grid=(1e-2,)))
        r = merge_table.run(sets, base, epochs=1, lr=1e-3, batch_size=8, seed=5, warmup=1, methods=("core-ties",),
                            save_dir=root / "spec", log=lambda *_: None)
    return root, base, r


def test_rows_seeds_and_saved_specialists(table):
    root, base, r = table
    tasks = [t.name for t in merge_tasks.TASKS]
    assert r["tasks"] == tasks and set(r["probes"]) == set(tasks)
    assert [r["training"][t]["seed"] for t in tasks] == [5, 6, 7, 8]  # distinct seeds
    assert set(r["defaults"]) == {"core-ties"} == set(r["tuned"])
    for t in tasks:
        ad = load_adapter(root / "spec" / f"{t}.safetensors", expected_base=base.spec)
        assert ad.tasks[0].name == t and ad.provenance["seed"] == r["training"][t]["seed"]
    md = merge_table.to_markdown({**r, "hardware": {}, "random_base": True})
    assert "**Tuned on validation**" in md and "| core-ties |" in md and "linear probe" in md


def test_two_parameter_methods_are_searched_coordinatewise(table):
    _, _, r = table
    row, grid = r["tuned"]["core-ties"], method("core-ties").grid
    assert row["grid_points"] == len(grid["scale"]) + len(grid["density"])
    assert set(row["chosen"]) == {"scale", "density"}
    assert row["parameters"]["scale"] == row["chosen"]["scale"] and row["parameters"]["density"] == row["chosen"]["density"]


def test_saved_specialists_are_reused_only_for_the_same_recipe(table):
    from medlego.jobs.datasets import load_dataset

    root, base, r = table
    t = merge_tasks.TASKS[1].name
    data = {t: load_dataset(root / f"{t}.npz", input_size=base.input_size, seed=5)}
    logs = []
    kw = dict(epochs=1, batch_size=8, seed=5, warmup=1, save_dir=root / "spec", offsets={t: 1}, log=logs.append)
    same, info = merge_table.train_specialists(base, data, lr=1e-3, **kw)
    assert "reused" in logs[-1] and info[t]["seed"] == 6 and info[t]["history"] is None
    assert same[t].provenance == load_adapter(root / "spec" / f"{t}.safetensors").provenance
    _, info = merge_table.train_specialists(base, data, lr=2e-3, **kw)  # another recipe: retrained (and overwritten)
    assert "retraining" in logs[-2] and info[t]["history"] is not None


def test_a_saved_specialist_of_another_base_is_retrained(table, other_base_file, tmp_path):
    """After the base is rebuilt (pretrain_base's new recipe), a specialist file of the old base is trained over,
    not an error (merge_table_seeds and figure2_seeds keep their specialists in one directory across bases)."""
    import shutil

    from medlego.jobs.datasets import load_dataset
    from medlego.runtime.base import load_base

    root, base, _ = table
    t = merge_tasks.TASKS[1].name
    shutil.copy(root / "spec" / f"{t}.safetensors", tmp_path / f"{t}.safetensors")  # made on the session's base
    other = load_base("vit_tiny_patch16_224", other_base_file)
    data = {t: load_dataset(root / f"{t}.npz", input_size=other.input_size, seed=5)}
    logs = []
    _, info = merge_table.train_specialists(other, data, epochs=1, lr=1e-3, batch_size=8, seed=5, warmup=1,
                                            save_dir=tmp_path, offsets={t: 1}, log=logs.append)
    assert "retraining" in logs[0] and info[t]["history"] is not None
    assert load_adapter(tmp_path / f"{t}.safetensors", expected_base=other.spec).base.fingerprint == other.spec.fingerprint
