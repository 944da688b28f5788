"""Fine-tuning: learns, saves what it learned, resumes exactly, starts from an adapter, refuses bad data."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from medlego.jobs.datasets import load_dataset
from medlego.jobs.evaluate import evaluate_adapter, predict_probs
from medlego.jobs.metrics import auc_binary
from medlego.jobs.synthetic import make_synthetic_medmnist
from medlego.jobs.train import TrainConfig, train_adapter
from medlego.runtime.adapter import load_adapter, save_adapter
from medlego.runtime.errors import BadInputError


@pytest.fixture(scope="module")
def blood(tmp_path_factory):
    return make_synthetic_medmnist(tmp_path_factory.mktemp("d") / "blood.npz", classes=4, n_train=160, n_val=60, n_test=60, seed=0)


def _cfg(**kw):
    base = dict(task="blood", epochs=3, batch_size=32, lr=3e-3, seed=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_the_saved_adapter_predicts_the_same(tmp_path, tiny_base, blood):
    data = load_dataset(blood, input_size=tiny_base.input_size)
    res = train_adapter(tiny_base, data, _cfg(), workdir=tmp_path / "w", log=lambda *_: None)
    assert res.val["accuracy"] > 0.6  # 4 classes: chance is 0.25
    assert res.adapter.provenance["init"] == "fresh" and res.adapter.provenance["dataset"]["sha256"] == data.fingerprint
    assert res.adapter.provenance["hyperparameters"]["rank"] == 4 and res.adapter.provenance["best_epoch"] == res.best_epoch
    path = tmp_path / "blood.safetensors"
    save_adapter(res.adapter, path)
    back = load_adapter(path, expected_base=tiny_base.spec)
    m = evaluate_adapter(tiny_base, back, data, "blood", "test")
    assert m["accuracy"] == pytest.approx(res.test["accuracy"]) and m["auc"] == pytest.approx(res.test["auc"])
    lines = (tmp_path / "w" / "metrics.jsonl").read_text().strip().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_base_file, blood):
    def run(*extra, workdir):
        return subprocess.run([sys.executable, "-m", "medlego", "train", "--model", "vit_tiny_patch16_224",
                               "--weights", str(tiny_base_file), "--data", str(blood), "--task", "blood",
                               "--epochs", "3", "--lr", "3e-3", "--no-progress", "--workdir", str(workdir),
                               "-o", str(workdir / "out.safetensors"), *extra], capture_output=True, text=True, timeout=300)

    full = run(workdir=tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killed = run("--stop-after-epoch", "1", workdir=tmp_path / "resumed")
    assert killed.returncode == 75 and not (tmp_path / "resumed" / "out.safetensors").exists()
    resumed = run("--resume", workdir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch 1" in resumed.stdout
    a = load_adapter(tmp_path / "full" / "out.safetensors")
    b = load_adapter(tmp_path / "resumed" / "out.safetensors")
    for k, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[k]), k
    assert a.provenance["test"] == b.provenance["test"] and b.provenance["resumed_from_epoch"] == 1


def test_init_adapter_run_and_provenance(tmp_path, tiny_base, blood, make_adapter):
    data = load_dataset(blood, input_size=tiny_base.input_size)
    start = make_adapter(seed=5, rank=[1 + i % 4 for i in range(2 * tiny_base.depth)])
    res = train_adapter(tiny_base, data, _cfg(epochs=1), init=(start, {"name": "general", "sha256": "ab" * 32, "version": 2}),
                        log=lambda *_: None)
    assert res.adapter.provenance["init"] == {"adapter": "general", "sha256": "ab" * 32, "version": 2}
    assert res.adapter.ranks() == start.ranks()  # each matrix keeps its rank from the start adapter
    assert not torch.equal(res.adapter.q[0].E, start.q[0].E)  # and was trained from there
    assert res.adapter.task_names == ["blood"] and res.adapter.heads["blood"].weight.shape == (4, tiny_base.embed_dim)
    wrong = make_adapter(seed=6, tasks=[__import__("medlego.runtime.adapter", fromlist=["TaskSpec"]).TaskSpec("blood", ("a", "b"))])
    with pytest.raises(BadInputError, match="task 'blood' has 2 classes, the dataset has 4"):
        train_adapter(tiny_base, data, _cfg(epochs=1), init=(wrong, {}))


def test_multilabel_training_and_auc(tmp_path, tiny_base):
    path = make_synthetic_medmnist(tmp_path / "chest.npz", classes=3, multilabel=True, n_train=160, n_val=60, n_test=60, seed=1)
    data = load_dataset(path, input_size=tiny_base.input_size)
    assert data.multilabel and data.num_classes == 3
    res = train_adapter(tiny_base, data, TrainConfig(task="chest", epochs=3, lr=3e-3, progress=False), log=lambda *_: None)
    assert res.adapter.tasks[0].multilabel and res.val["auc"] > 0.75
    assert len(res.test["auc_per_label"]) == 3
    # the AUC is the pairwise definition
    probs = predict_probs(tiny_base, res.adapter, data.split("test").images)
    y = data.split("test").labels
    for c in range(3):
        pos, neg = probs[y[:, c] > 0.5, c], probs[y[:, c] < 0.5, c]
        pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
        assert res.test["auc_per_label"][c] == pytest.approx(float(pairwise), abs=1e-9)


def test_auc_with_ties():
    s = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.4])
    y = torch.tensor([0, 1, 0, 1, 1])
    assert auc_binary(s, y) == pytest.approx((1 + 0.5 + 1 + 1 + 1 + 0.5) / 6)


def test_bad_inputs_fail_before_training(tmp_path, tiny_base):
    arrays = {f"{s}_{k}": v for s in ("train", "val") for k, v in
              (("images", np.zeros((4, 28, 28), np.uint8)), ("labels", np.array([[0], [1], [0], [1]])))}
    np.savez(tmp_path / "nosplit.npz", **arrays)
    with pytest.raises(BadInputError, match="no 'test_images' array: missing the 'test' split"):
        load_dataset(tmp_path / "nosplit.npz", input_size=32)
    arrays.update(test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([[0], [7]]))
    np.savez(tmp_path / "range.npz", **arrays)
    with pytest.raises(BadInputError, match="label 7 is out of range for 2 classes"):
        load_dataset(tmp_path / "range.npz", input_size=32, num_classes=2)
    (tmp_path / "m.csv").write_text("path,label\nbroken.png,a\nok.png,b\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(BadInputError, match="unreadable image .*broken.png"):
        load_dataset(tmp_path / "m.csv", input_size=32)
