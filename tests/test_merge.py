"""Merging: Med-LEGO in factor space equals the dense SVD; each baseline equals its formula."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from medlego.cli import main
from medlego.runtime.adapter_merge import merge_adapters
from medlego.runtime import merging
from medlego.runtime.adapter import load_adapter, save_adapter
from medlego.runtime.errors import BadInputError, IncompatibleAdapterError
from medlego.jobs.synthetic import random_lowrank


def _sources(ranks, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:  # non-orthonormal factors too: the method must not rely on them being SVD-shaped
        m = random_lowrank(d, r, g, scale=0.1)
        out.append(type(m)(m.A + 0.05 * torch.randn(m.A.shape, generator=g), m.E, m.B))
    return out


def _dense_reference(sources, v, weights=None):
    n = len(sources)
    w = weights or [1 / n] * n
    mean = sum(wi * ((m.B.double() * m.E.double()) @ m.A.double()).numpy() for wi, m in zip(w, sources))
    u, s, vh = np.linalg.svd(mean)
    cum = np.cumsum(s)
    k = int(np.searchsorted(cum, v * s.sum() * (1 - 1e-12)) + 1)
    return (u[:, :k] * s[:k]) @ vh[:k], k


@pytest.mark.parametrize("v", [0.5, 0.9, 0.997, 1.0])
def test_med_lego_equals_dense_svd(v):
    srcs = _sources([1, 3, 4, 6, 2])
    res = merging.med_lego(srcs, threshold=v)
    ref, k = _dense_reference(srcs, v)
    got = res.factors.delta().double().numpy()
    assert res.rank == k
    assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)
    if v == 1.0:  # exact: the full average
        full = sum(m.delta().double() for m in srcs) / len(srcs)
        assert torch.allclose(res.factors.delta().double(), full, atol=1e-6)


def test_med_lego_weights_and_max_rank():
    srcs = _sources([4, 4, 4], seed=1)
    res = merging.med_lego(srcs, weights=[0.5, 0.3, 0.2], threshold=1.0, max_rank=5)
    ref, _ = _dense_reference(srcs, 1.0, [0.5, 0.3, 0.2])
    u, s, vh = np.linalg.svd(ref)
    assert res.rank == 5 and np.allclose(res.factors.delta().double().numpy(), (u[:, :5] * s[:5]) @ vh[:5], atol=1e-6)
    assert res.kept_share == pytest.approx(s[:5].sum() / s.sum(), rel=1e-6)


def test_merging_one_adapter_returns_it():
    (m,) = _sources([5], seed=2)
    res = merging.med_lego([m], threshold=1.0)
    assert torch.allclose(res.factors.delta(), m.delta(), atol=1e-6)
    assert torch.allclose(res.factors.A @ res.factors.A.T, torch.eye(res.rank), atol=1e-5)  # a proper SVD-LoRA


def test_dense_baselines_match_their_formulas():
    srcs = _sources([2, 3, 4], seed=3)
    dense = torch.stack([m.delta().double() for m in srcs])
    d = lambda r: r.factors.delta().double()  # noqa: E731
    assert torch.allclose(d(merging.delta_avg(srcs)), dense.mean(0), atol=1e-6)
    assert torch.allclose(d(merging.task_arithmetic(srcs, scale=0.4)), 0.4 * dense.sum(0), atol=1e-6)
    idx = dense.abs().argmax(0)
    magmax = torch.gather(dense, 0, idx.unsqueeze(0))[0]
    assert torch.allclose(d(merging.magmax(srcs)), magmax, atol=1e-6)
    be = [m.B.double() * m.E.double() for m in srcs]
    a = [m.A.double() for m in srcs]
    pad = lambda t, r, dim: torch.nn.functional.pad(t, (0, r - t.shape[1]) if dim == 1 else (0, 0, 0, r - t.shape[0]))  # noqa: E731
    lora_avg = (sum(pad(b, 4, 1) for b in be) / 3) @ (sum(pad(x, 4, 0) for x in a) / 3)
    assert torch.allclose(d(merging.lora_avg(srcs)), lora_avg, atol=1e-6)
    pem = (sum(s * pad(b, 4, 1) for s, b in zip([1, 1, -1], be)) / 3) @ (sum(pad(x, 4, 0) for x in a) / 3)
    assert torch.allclose(d(merging.pem(srcs, signs=[1, 1, -1])), pem, atol=1e-6)
    # iso-c: the sum's span, a flat spectrum at alpha x the mean over all min(m, n) = 48 singular values
    total = dense.sum(0)
    u, s, vh = torch.linalg.svd(total)
    r = int((s > s[0] * 1e-7).sum())
    iso = 0.7 * s.mean() * u[:, :r] @ vh[:r]
    assert torch.allclose(d(merging.iso_c(srcs, alpha=0.7)), iso, atol=1e-6)
    assert merging.iso_c(srcs, max_rank=3).kept_share == pytest.approx(3 / r)  # equal values: 3 of r kept
    # tsv keeps every direction of LoRA-rank tasks (48 // 3 = 16 >= ranks 2, 3, 4), merged bases orthonormal
    t = merging.tsv(srcs)
    assert t.rank == 9
    assert torch.allclose(t.factors.B.T @ t.factors.B, torch.eye(9), atol=1e-5)
    assert torch.allclose(t.factors.A @ t.factors.A.T, torch.eye(9), atol=1e-5)
    assert merging.tsv(srcs, keep=0.5).rank == 1 + 2 + 2  # ceil(r / 2) each
    # with orthogonal tasks, TSV is the plain sum
    orth = _sources([2, 2], d=48, seed=9)
    q, _ = torch.linalg.qr(torch.randn(48, 8, dtype=torch.float64))
    orth = [type(m)(q[:, 4 * i:4 * i + 2].T.float(), m.E, q[:, 4 * i + 2:4 * i + 4].float()) for i, m in enumerate(orth)]
    full = sum(m.delta().double() for m in orth)
    assert torch.allclose(d(merging.tsv(orth)), full, atol=1e-5)


def test_ties_dare_magnitude_agree_with_peft():
    srcs = _sources([3, 4, 2], d=24, seed=4)
    dense = [m.delta().double() for m in srcs]
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    ours = merging.ties(srcs, density=0.3, weights=w.tolist()).factors.delta().double()
    assert torch.allclose(ours, merge_utils.ties(dense, w, 0.3), atol=1e-6)
    ours = merging.magnitude_prune(srcs, density=0.4, weights=w.tolist()).factors.delta().double()
    assert torch.allclose(ours, merge_utils.magnitude_prune(dense, w, 0.4), atol=1e-6)
    # DARE draws its masks from torch.bernoulli: PEFT from the global generator, we from the merge's
    # own; seeded alike, both draw the same masks in the same order.
    torch.manual_seed(123)
    theirs = merge_utils.dare_linear(dense, w, 0.6)  # density 0.6 = drop 0.4
    ours = merging.dare(srcs, drop=0.4, weights=w.tolist(), generator=torch.Generator().manual_seed(123))
    assert torch.allclose(ours.factors.delta().double(), theirs, atol=1e-6)


def test_dare_draws_independent_masks_per_matrix_from_one_seed(make_adapter):
    a, b = make_adapter(seed=1, rank=3), make_adapter(seed=2, rank=3)
    same = [replace(ad, q=(ad.q[0],) * ad.depth, v=(ad.q[0],) * ad.depth) for ad in (a, b)]  # every matrix alike
    merged, report = merge_adapters(same, "dare", {"drop": 0.5, "seed": 7})
    deltas = [m.delta() for m in (*merged.q, *merged.v)]
    assert all((deltas[0] - x).abs().max() > 1e-4 for x in deltas[1:])  # a mask of its own in every matrix
    again, _ = merge_adapters(same, "dare", {"drop": 0.5, "seed": 7})
    assert all(torch.equal(x.delta(), y.delta()) for x, y in zip(merged.q, again.q))  # one seed: reproducible
    other, _ = merge_adapters(same, "dare", {"drop": 0.5, "seed": 8})
    assert not torch.equal(other.q[0].delta(), merged.q[0].delta())
    assert report["parameters"]["seed"] == 7 and merged.provenance["parameters"]["seed"] == 7


def test_merge_job_heads_provenance_and_refusals(tmp_path, make_adapter, tiny_base, other_base_file):
    from medlego.runtime.adapter import TaskSpec
    from medlego.runtime.base import load_base
    from medlego.jobs.synthetic import random_adapter

    a = make_adapter(seed=1, rank=3, tasks=[TaskSpec("blood", tuple("abcdefgh"))])
    b = make_adapter(seed=2, rank=5, tasks=[TaskSpec("derma", tuple("abcdefg"))])
    c = make_adapter(seed=3, rank=4, tasks=[TaskSpec("blood", tuple("xy"))])
    merged, report = merge_adapters([a, b], "med-lego", {"threshold": 0.997},
                                    source_info=[{"ref": "a", "sha256": "1" * 64}, {"ref": "b", "sha256": "2" * 64}])
    assert merged.task_names == ["blood", "derma"]
    assert torch.equal(merged.heads["derma"].weight, b.heads["derma"].weight)
    prov = merged.provenance
    assert prov["method"] == "med-lego" and prov["parameters"] == {"threshold": 0.997, "weights": None, "max_rank": None}
    _, dare_report = merge_adapters([a, b], "dare", {"drop": 0.3})  # defaults are recorded too (reproducibility)
    assert dare_report["parameters"] == {"drop": 0.3, "scale": 1.0, "seed": 0, "weights": None, "max_rank": None}
    assert [s["sha256"] for s in prov["sources"]] == ["1" * 64, "2" * 64]
    assert set(prov["matrices"]["blocks.0.q"]) == {"rank", "kept_share"} and prov["matrices"]["blocks.0.q"]["rank"] <= 8
    with pytest.raises(BadInputError, match="task 'blood' appears in 'source0' and 'source2'"):
        merge_adapters([a, b, c], "med-lego")
    renamed, _ = merge_adapters([a, b, c], "med-lego", task_names=["blood", "derma", "blood2"])
    assert renamed.task_names == ["blood", "derma", "blood2"]
    other = load_base("vit_tiny_patch16_224", other_base_file)
    foreign = random_adapter(other.spec, other.preprocess, seed=9)
    with pytest.raises(IncompatibleAdapterError, match="source 'odd' was made for base"):
        merge_adapters([a, foreign], "med-lego", source_info=[{"ref": "a"}, {"ref": "odd"}])
    with pytest.raises(IncompatibleAdapterError, match="source 'odd' was made for base .* but 'b' for"):  # odd one first
        merge_adapters([foreign, b, a], "med-lego", source_info=[{"ref": "odd"}, {"ref": "b"}, {"ref": "a"}])
    with pytest.raises(BadInputError, match="takes"):
        merge_adapters([a, b], "magmax", {"density": 0.3})


def test_merge_cli_writes_adapter_and_report(tmp_path, make_adapter):
    paths = []
    for s in range(3):
        p = tmp_path / f"a{s}.safetensors"
        save_adapter(make_adapter(seed=s, rank=2 + s), p)
        paths.append(str(p))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--method", "med-lego", "--threshold", "0.99", "-o", str(out), *paths]) == 0
    merged = load_adapter(out)
    assert merged.task_names == ["task0", "task1", "task2"]
    assert merged.provenance["sources"][1]["path"] == paths[1]
    assert (tmp_path / "merged.report.json").stat().st_size > 0 and (tmp_path / "merged.report.png").stat().st_size > 0
    assert main(["merge", "--method", "ties", "--density", "0.5", "--max-rank", "6", "-o", str(out), *paths]) == 0
    assert load_adapter(out).max_rank == 6
