"""Classification metrics without sklearn: accuracy, one-vs-rest AUC (macro), per-label AUC."""

from __future__ import annotations

import math

import torch


def auc_binary(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """ROC AUC by the Mann–Whitney U statistic with average ranks for ties; NaN if one class is absent."""
    scores = scores.double().flatten()
    positives = positives.bool().flatten()
    n_pos = int(positives.sum())
    n_neg = positives.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    i, n = 0, scores.numel()
    pos = torch.arange(1, n + 1, dtype=torch.float64)
    while i < n:  # average ranks over runs of equal scores
        j = i
        while j + 1 < n and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = pos[i:j + 1].mean()
        i = j + 1
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def single_label_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """probs [N, C] (softmax), labels [N] int → accuracy and macro one-vs-rest AUC."""
    acc = float((probs.argmax(1) == labels).double().mean()) if len(labels) else float("nan")
    per_class = [auc_binary(probs[:, c], labels == c) for c in range(probs.shape[1])]
    return {"accuracy": acc, "auc": _nanmean(per_class), "auc_per_class": per_class, "n": int(len(labels))}


def multi_label_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """probs [N, C] (sigmoid), labels [N, C] {0,1} → per-label AUC, mean AUC, and exact-match-free accuracy
    (the mean over labels of thresholded-at-0.5 correctness)."""
    per_label = [auc_binary(probs[:, c], labels[:, c] > 0.5) for c in range(probs.shape[1])]
    acc = float(((probs > 0.5) == (labels > 0.5)).double().mean()) if len(labels) else float("nan")
    return {"accuracy": acc, "auc": _nanmean(per_label), "auc_per_label": per_label, "n": int(len(labels))}


def metrics_for(probs: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> dict:
    return multi_label_metrics(probs, labels) if multilabel else single_label_metrics(probs, labels)
