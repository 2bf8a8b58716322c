"""A training run's log: one JSON object per line, and the loss curves drawn from it as PNG."""

from __future__ import annotations

import json
from pathlib import Path


def append_log(path: str | Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_log(path: str | Path, after_step: int) -> None:
    """Drop records past ``after_step`` (a resumed run rewrites them)."""
    records = [r for r in read_log(path) if r.get("step", 0) <= after_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _smooth(values: list[float], weight: float = 0.6) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_loss_curves(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss (raw and smoothed), learning rate and temperature against step; None when nothing is logged yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log_path) if "loss" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr, ax_scale) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], alpha=0.3, label="loss")
    ax_loss.plot(steps, _smooth([r["loss"] for r in records]), label="smoothed")
    evals = [r for r in read_log(log_path) if "val_loss" in r]
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax_loss.set(title="contrastive loss", xlabel="step")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records])
    ax_lr.set(title="learning rate", xlabel="step")
    ax_scale.plot(steps, [r["logit_scale"] for r in records])
    ax_scale.set(title="logit scale (1 / temperature)", xlabel="step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return Path(png_path)
