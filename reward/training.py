"""Training a group reward model on impressions, readable top to bottom.

``train_reward(config, progress)``: read impressions, split them by held-out items, embed
every item and brief once (cached), then minibatch gradient descent through accelerate on
the listwise / pairwise / mixed loss, with a held-out evaluation every epoch, early stopping
on the held-out loss, and the best weights saved with ``save_pretrained``. With
``clip_lora`` set, a second phase trains a LoRA on the CLIP's image tower together with the
best model (``reward.clip_lora``); the adapter is saved in the model folder.

Run folder::

    model/             config.json + model.safetensors (RewardModel.from_pretrained), the best so far
    train_config.json  the RewardTrainingConfig this run used
    log.jsonl          train loss per log interval, held-out loss and accuracy per epoch
    curves.png         the curves
    training_items.txt every item the model trained on (evaluation checks held-out items against it)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from genshop.embedding import EmbeddingConfig
from genshop.run_log import append_log
from reward.clip_lora import LORA_FOLDER, ClipLoraConfig, item_pixels, lora_fingerprint, save_image_lora, tune_image_lora
from reward.curves import plot_training_curves
from reward.data import ImpressionTensors, impression_tensors, predict
from reward.features import EmbedderFeatures, FeatureSource
from reward.groups import load_groups
from reward.impressions import read_impression_files
from reward.losses import impression_loss
from reward.metrics import accuracy, log_loss
from reward.model import RewardModel, RewardModelConfig
from reward.splits import plan_split

TRAINING_ITEMS = "training_items.txt"


class RewardArchitecture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_dim: int = Field(default=64, ge=1)
    cross_layers: int = Field(default=3, ge=0)
    deep_layers: int = Field(default=2, ge=0)
    deep_dim: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)


class RewardTrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    impressions: list[Path] = Field(min_length=1, description="impressions Parquet files (format v1)")
    groups: Path = Field(description="groups YAML; only its `groups:` section is read")
    out_dir: Path
    catalog: list[Path] = Field(default_factory=list, description="catalog parquet files holding the items' images")
    embedding: EmbeddingConfig | None = Field(default=None, description="the frozen CLIP; None when features are given")
    cache_dir: Path | None = Field(default=None, description="embedding cache (default <out_dir>/../cache/reward-embeddings)")
    architecture: RewardArchitecture = Field(default_factory=RewardArchitecture)
    use_groups: bool = Field(default=True, description="False trains the group-agnostic baseline of the same size")
    loss: Literal["listwise", "pairwise", "mixed"] = "listwise"
    mix_weight: float = Field(default=0.5, ge=0, le=1, description="listwise share of the mixed loss")
    batch_size: int = Field(default=256, ge=1, description="impressions per step")
    learning_rate: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    max_epochs: int = Field(default=40, ge=1)
    patience: int = Field(default=5, ge=1, description="epochs without a better held-out loss before stopping")
    holdout_fraction: float = Field(default=0.1, gt=0, lt=1, description="share of items held out for early stopping")
    min_held_out: int = Field(default=500, ge=1, description="an item split holding out fewer impressions than this "
                                                            "switches to the impression split (and says so)")
    split: Literal["items", "impressions"] = Field(
        default="items", description="hold out items (the default), or impressions when there are too few items "
                                     "for an item split (an A/B import shows a handful of listings per brief)")
    group_dropout: float = Field(default=0.15, ge=0, le=1, description="share of training rows shown as the population")
    grad_clip: float = Field(default=1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    log_every: int = Field(default=50, ge=1)
    clip_lora: ClipLoraConfig | None = Field(default=None, description="None: the CLIP stays frozen; else phase 2 "
                                             "trains a LoRA on its image tower with the model (reward.clip_lora)")


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    message: str = ""
    notice: bool = False  # a message to keep on the console and in the log (what the split kept and dropped)


ProgressCallback = Callable[[TrainProgress], None]


def learning_rate_at(step: int, config: RewardTrainingConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak over the longest possible run."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_metrics(model: RewardModel, data: ImpressionTensors, device) -> dict[str, float]:
    rewards, no_choice = predict(model, data, device=device)
    mask, chosen = data.mask.numpy(), data.chosen.numpy()
    return {"val_loss": log_loss(rewards, mask, chosen, no_choice), "val_accuracy": accuracy(rewards, mask, chosen)}


def train_image_lora(config: RewardTrainingConfig, model: RewardModel, features: EmbedderFeatures,
                     data: ImpressionTensors, train: ImpressionTensors, held: ImpressionTensors,
                     generator: torch.Generator, device, report: ProgressCallback, log: Callable[[dict], None]) -> dict:
    """Phase 2 (``reward.clip_lora``): every item's pixels once, then the adapters and the model together."""
    report(TrainProgress(0, 0, 0.0, message=f"phase 2: preprocessing {len(data.item_ids)} item images"))
    pixels = item_pixels(features.embedder, data.item_ids, features.images.image)
    report(TrainProgress(0, 0, 0.0, message="phase 2: LoRA on the CLIP image tower"))
    best = tune_image_lora(
        model.to(device), features.embedder, pixels, train, held, config.clip_lora,
        lambda rewards, no_choice, mask, chosen: impression_loss(config.loss, rewards, no_choice, mask, chosen,
                                                                 config.mix_weight),
        held_out_metrics, log, generator, config.group_dropout,
        lambda step, total, loss: report(TrainProgress(step, total, config.clip_lora.epochs * step / total, loss,
                                                       message="phase 2 (LoRA on the CLIP)")))
    report(TrainProgress(0, 0, best["epoch"], val_loss=best["val_loss"], val_accuracy=best["val_accuracy"],
                         message=f"phase 2: best at epoch {best['epoch']}"))
    return best


def train_reward(config: RewardTrainingConfig, progress: ProgressCallback | None = None,
                 features: FeatureSource | None = None) -> Path:
    """Train a reward model; returns its folder (``<out_dir>/model``). ``features`` overrides the embedder."""
    from accelerate import Accelerator

    report = progress or (lambda p: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    log_path = out_dir / "log.jsonl"
    log_path.unlink(missing_ok=True)

    # 1. data: impressions split by held-out items, every item and brief embedded once
    report(TrainProgress(0, 0, 0.0, message="reading impressions"))
    frame = read_impression_files(config.impressions)
    groups = load_groups(config.groups)
    unknown = sorted(set(frame["group_id"]) - {g.id for g in groups})
    if unknown:
        raise ValueError(f"impressions name groups {unknown} that {config.groups} does not declare")
    train_rows, held_rows, split = plan_split(frame["impression_id"].tolist(), frame["items"].tolist(), config.split,
                                              config.holdout_fraction, config.min_held_out)
    append_log(log_path, {"event": "split", **split.model_dump()})
    report(TrainProgress(0, 0, 0.0, message=split.describe(), notice=True))
    if not train_rows.any() or not held_rows.any():
        raise ValueError(f"the {config.split} split left {train_rows.sum()} training and {held_rows.sum()} held-out "
                         "impressions; simulate with pools, change holdout_fraction, or (few items, as in an A/B "
                         "import) split by impressions")
    if features is None:
        if config.embedding is None:
            raise ValueError("no embedding config and no feature source given")
        cache_dir = config.cache_dir or out_dir.parent / "cache" / "reward-embeddings"
        features = EmbedderFeatures(config.embedding, config.catalog, cache_dir)
    if config.clip_lora is not None and not isinstance(features, EmbedderFeatures):
        raise ValueError("clip_lora tunes the CLIP's image tower: it needs an embedding config, not given features")
    model_config = RewardModelConfig.for_groups(
        features.dim, groups, use_groups=config.use_groups, **config.architecture.model_dump(),
        embedding=getattr(features, "embedding", None), embedder_fingerprint=getattr(features, "fingerprint", None))
    model = RewardModel(model_config)
    frame = frame[train_rows | held_rows].reset_index(drop=True)
    train_rows, held_rows = train_rows[train_rows | held_rows], held_rows[train_rows | held_rows]
    report(TrainProgress(0, 0, 0.0, message=f"embedding items of {len(frame)} impressions"))
    data = impression_tensors(frame, features, lambda g: model.group_index(g)[0],
                              lambda done, total: report(TrainProgress(0, 0, 0.0, message=f"embedded {done}/{total} items")))
    train, held = data.subset(train_rows), data.subset(held_rows)

    # 2. model and optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    total_steps = steps_per_epoch * config.max_epochs
    generator = torch.Generator().manual_seed(config.seed)
    best = {"val_loss": float("inf"), "epoch": 0, "state": None}
    append_log(log_path, {"event": "start", "train_impressions": len(train), "held_out_impressions": len(held),
                          "items": len(data.item_ids), "briefs": len(data.brief_texts)})

    # 3. the loop: an epoch of shuffled batches, then the held-out items decide whether to go on
    step, tick = 0, time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), config.batch_size):
            lr = learning_rate_at(step, config, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, briefs, group_index, mask, chosen = train.batch(order[start:start + config.batch_size], device)
            if config.group_dropout > 0:
                dropped = torch.rand(len(group_index), generator=generator).to(device) < config.group_dropout
                group_index = group_index.masked_fill(dropped, 0)

            with accelerator.autocast():
                rewards, no_choice = model(images, briefs, group_index)
            loss = impression_loss(config.loss, rewards.float(), no_choice.float(), mask, chosen, config.mix_weight)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1

            if step % config.log_every == 0:
                record = {"step": step, "epoch": step / steps_per_epoch, "train_loss": loss.item(), "lr": lr,
                          "steps_per_s": config.log_every / (time.perf_counter() - tick)}
                append_log(log_path, record)
                report(TrainProgress(step, total_steps, record["epoch"], record["train_loss"],
                                     best["val_loss"] if best["state"] else None))
                tick = time.perf_counter()

        metrics = held_out_metrics(raw_model, held, device)
        append_log(log_path, {"step": step, "epoch": epoch, **metrics})
        plot_training_curves(log_path, out_dir / "curves.png")
        report(TrainProgress(step, total_steps, epoch, loss.item(), metrics["val_loss"], metrics["val_accuracy"]))
        if metrics["val_loss"] < best["val_loss"] - 1e-4:
            best = {"val_loss": metrics["val_loss"], "epoch": epoch, "state": copy.deepcopy(raw_model.state_dict())}
            raw_model.save_pretrained(out_dir / "model")  # an interrupted run still leaves its best model
        elif epoch - best["epoch"] >= config.patience:
            report(TrainProgress(step, total_steps, epoch, message=f"early stop: best held-out loss at epoch {best['epoch']}"))
            break

    # 4. the best weights, as a from_pretrained folder
    raw_model.load_state_dict(best["state"])
    append_log(log_path, {"event": "best", "epoch": best["epoch"], "val_loss": best["val_loss"]})
    model_dir = out_dir / "model"
    if config.clip_lora is not None:  # optional phase 2: LoRA on the CLIP's image tower, from the best model
        tuned = train_image_lora(config, raw_model, features, data, train, held, generator, device, report,
                                 lambda record: append_log(log_path, record))
        append_log(log_path, {"event": "best", "phase": "clip_lora", **tuned})
        if tuned["epoch"] > 0:  # else no adapter beat the frozen CLIP on held-out items: the model keeps it frozen
            save_image_lora(features.embedder, model_dir / LORA_FOLDER)
            raw_model.config.image_lora = LORA_FOLDER
            raw_model.config.embedder_fingerprint = lora_fingerprint(features.fingerprint, model_dir / LORA_FOLDER)
    raw_model.save_pretrained(model_dir)
    (out_dir / TRAINING_ITEMS).write_text("\n".join(data.item_ids[i] for i in np.unique(train.item_rows[train.mask].numpy()))
                                          + "\n", encoding="utf-8")
    plot_training_curves(log_path, out_dir / "curves.png")
    report(TrainProgress(step, total_steps, best["epoch"], message=f"saved {model_dir} (best epoch {best['epoch']})"))
    return model_dir
