"""The judge: a small image classifier trained on real catalog photos, used only to evaluate.

It predicts master category, article type and colour from a 48x64 photo, and its
penultimate features give the space in which generated and real images are compared
(Fréchet distance). The product never calls it: it grades the generator from outside,
so the generator cannot be tuned towards it by accident.

``JudgeModel.save_pretrained(dir)`` writes ``config.json`` (architecture and label
vocabularies) and ``model.safetensors``; ``JudgeModel.from_pretrained(dir)`` reads them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

JUDGED = ("master_category", "article_type", "colour")
MEAN = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
STD = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)

ProgressCallback = Callable[[int, int, dict], None]  # (step, total, metrics)


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = 48
    height: int = 64
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 192])
    labels: dict[str, list[str]] = Field(description="label vocabulary per judged column")


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.skip = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))
                     if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class JudgeModel(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        channels = config.channels
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(channels[max(0, i - 1)], c, 1 if i == 0 else 2)
                                      for i, c in enumerate(channels)])
        self.heads = nn.ModuleDict({column: nn.Linear(channels[-1], len(labels)) for column, labels in config.labels.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the Fréchet distance's space) of ``[n, 3, h, w]`` pixels in [0, 1]."""
        x = self.blocks(self.stem((pixels - MEAN.to(pixels)) / STD.to(pixels)))
        return x.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        return {column: head(features) for column, head in self.heads.items()}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(self.config.model_dump_json(indent=1))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "JudgeModel":
        directory = Path(directory)
        model = cls(JudgeConfig.model_validate_json((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def to_pixels(images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
    return torch.stack([
        torch.from_numpy(np.array(image.convert("RGB").resize((width, height), Image.BICUBIC))).permute(2, 0, 1)
        for image in images
    ]).float() / 255.0


@torch.inference_mode()
def judge_images(model: JudgeModel, pixels: torch.Tensor, batch_size: int = 256) -> tuple[dict[str, list[str]], np.ndarray]:
    """Predicted labels per judged column, and the features, for pixels in [0, 1]."""
    predictions: dict[str, list[str]] = {column: [] for column in model.config.labels}
    features = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start:start + batch_size]
        feats = model.features(batch)
        features.append(feats.numpy())
        for column, head in model.heads.items():
            labels = model.config.labels[column]
            predictions[column].extend(labels[i] for i in head(feats).argmax(dim=1).tolist())
    return predictions, np.concatenate(features)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    tr(sqrt(A B)) is computed as the sum of square roots of the eigenvalues of
    sqrt(A) B sqrt(A), which is symmetric, so ``numpy.linalg.eigh`` suffices."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


class JudgeTrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[str]
    out: str
    width: int = 48
    height: int = 64
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    threads: int | None = None
    max_items: int | None = None


def train_judge(config: JudgeTrainingConfig, progress: ProgressCallback | None = None) -> Path:
    """Train the judge on real catalog photos (flip and small shift augmentation); save it to ``out``."""
    from genshop.catalog_data import read_catalog
    from genshop.training.generator import catalog_pixels

    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = read_catalog(config.data)
    if config.max_items:
        frame = frame.iloc[: config.max_items].reset_index(drop=True)
    judge_config = JudgeConfig(width=config.width, height=config.height,
                               labels={c: sorted(frame[c].unique().tolist()) for c in JUDGED})
    pixels = catalog_pixels(frame, judge_config.width, judge_config.height, out / f"pixels-{len(frame)}.safetensors")
    targets = {c: torch.tensor([judge_config.labels[c].index(v) for v in frame[c]]) for c in JUDGED}
    torch.manual_seed(config.seed)
    model = JudgeModel(judge_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(frame) / config.batch_size)
    total = config.epochs * steps_per_epoch
    step, started, log = 0, time.time(), []
    for _epoch in range(config.epochs):
        order = torch.randperm(len(frame))
        for start in range(0, len(frame), config.batch_size):
            index = order[start:start + config.batch_size]
            batch = pixels[index].float() / 255.0
            if torch.rand(()) < 0.5:
                batch = batch.flip(3)
            dx, dy = torch.randint(-4, 5, (2,)).tolist()
            batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = model(batch)
            loss = sum(F.cross_entropy(logits[c], targets[c][index], label_smoothing=0.05) for c in JUDGED)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            log.append({"step": step, "loss": loss.item()})
            if progress:
                progress(step, total, {"loss": loss.item(), "images_per_s": step * config.batch_size / (time.time() - started)})
    model.eval().save_pretrained(out)
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return out
