"""PNG plots for offline jobs (matplotlib's Agg backend; imported lazily so serving never needs it)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], out: str | Path, title: str = "") -> Path | None:
    """Training loss and validation accuracy/AUC per epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional (the `train` extra)
        return None
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title=f"{title} loss")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    ax2.plot(epochs, [h["val_auc"] for h in history], marker="s", label="val AUC")
    ax2.set(xlabel="epoch", ylim=(0, 1.02), title=f"{title} validation")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
