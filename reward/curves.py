"""A reward training run's log (JSON lines) and its curves as PNG."""

from __future__ import annotations

from pathlib import Path

from genshop.run_log import read_log


def plot_training_curves(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Train loss against step; held-out loss and accuracy against epoch. None when nothing is logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if "train_loss" in r]
    held = [r for r in records if "val_accuracy" in r]
    if not train and not held:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["epoch"] for r in train], [r["train_loss"] for r in train], alpha=0.5, label="train")
    if held:
        ax_loss.plot([r["epoch"] for r in held], [r["val_loss"] for r in held], "o-", label="held-out items")
        ax_acc.plot([r["epoch"] for r in held], [r["val_accuracy"] for r in held], "o-", label="held-out accuracy")
        best = min(held, key=lambda r: r["val_loss"])
        ax_loss.axvline(best["epoch"], color="grey", linestyle=":", label=f"best (epoch {best['epoch']:g})")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_loss.legend()
    ax_acc.set(title="accuracy on held-out items (ties half)", xlabel="epoch")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return Path(png_path)
