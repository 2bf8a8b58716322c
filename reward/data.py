"""Impressions as tensors: every item and brief embedded once, impressions as index matrices.

``ImpressionTensors`` holds an item embedding matrix ``[items, D]``, a brief embedding matrix
``[briefs, D]`` and, per impression, the rows of its K items (padded, with a mask, when K
varies), the chosen index (``-1`` for none) and the group index of a ``RewardModel``. A batch
gathers embeddings by index, so training never touches images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from reward.features import FeatureSource
from reward.model import RewardModel

ProgressCallback = Callable[[int, int], None]


@dataclass
class ImpressionTensors:
    item_ids: list[str]
    item_embeddings: torch.Tensor  # [items, D]
    brief_texts: list[str]
    brief_embeddings: torch.Tensor  # [briefs, D]
    item_rows: torch.Tensor  # [N, K] long, 0 where padded
    mask: torch.Tensor  # [N, K] bool
    chosen: torch.Tensor  # [N] long, -1 = none
    group_index: torch.Tensor  # [N] long, model's group index (0 = population)
    brief_rows: torch.Tensor  # [N] long

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, rows: np.ndarray | torch.Tensor) -> "ImpressionTensors":
        rows = torch.as_tensor(np.flatnonzero(rows) if getattr(rows, "dtype", None) == bool else rows)
        return ImpressionTensors(self.item_ids, self.item_embeddings, self.brief_texts, self.brief_embeddings,
                                 self.item_rows[rows], self.mask[rows], self.chosen[rows], self.group_index[rows],
                                 self.brief_rows[rows])

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [B, K, D], briefs [B, D], groups [B], mask [B, K], chosen [B]) on ``device``."""
        images = self.item_embeddings[self.item_rows[rows]]
        briefs = self.brief_embeddings[self.brief_rows[rows]]
        return (images.to(device), briefs.to(device), self.group_index[rows].to(device),
                self.mask[rows].to(device), self.chosen[rows].to(device))


def impression_tensors(frame: pd.DataFrame, features: FeatureSource, group_index: Callable[[str], int],
                       progress: ProgressCallback | None = None) -> ImpressionTensors:
    """Embed every distinct item and brief of ``frame`` (through the feature source's cache) and index them."""
    item_lists = [list(items) for items in frame["items"]]
    item_ids = list(dict.fromkeys(item for items in item_lists for item in items))
    item_row = {item: i for i, item in enumerate(item_ids)}
    brief_texts = list(dict.fromkeys(frame["brief"].fillna("").tolist()))
    brief_row = {text: i for i, text in enumerate(brief_texts)}

    item_embeddings = torch.from_numpy(np.ascontiguousarray(features.item_embeddings(item_ids, progress), dtype=np.float32))
    brief_embeddings = torch.from_numpy(np.ascontiguousarray(features.text_embeddings(brief_texts), dtype=np.float32))

    k = max(len(items) for items in item_lists)
    rows = np.zeros((len(frame), k), dtype=np.int64)
    mask = np.zeros((len(frame), k), dtype=bool)
    chosen = np.full(len(frame), -1, dtype=np.int64)
    for i, (items, picked) in enumerate(zip(item_lists, frame["chosen"])):
        rows[i, :len(items)] = [item_row[item] for item in items]
        mask[i, :len(items)] = True
        if isinstance(picked, str):
            chosen[i] = items.index(picked)
    groups = np.array([group_index(g) for g in frame["group_id"]], dtype=np.int64)
    briefs = np.array([brief_row[text] for text in frame["brief"].fillna("")], dtype=np.int64)
    return ImpressionTensors(item_ids, item_embeddings, brief_texts, brief_embeddings, torch.from_numpy(rows),
                             torch.from_numpy(mask), torch.from_numpy(chosen), torch.from_numpy(groups),
                             torch.from_numpy(briefs))


@torch.no_grad()
def predict(model: RewardModel, data: ImpressionTensors, batch_size: int = 2048,
            device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The model's rewards ``[N, K]`` and no-choice logits ``[N]`` for every impression."""
    was_training = model.training
    model.eval()
    rewards, no_choice = [], []
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        images, briefs, groups, _, _ = data.batch(rows, device)
        r, n = model(images, briefs, groups)
        rewards.append(r.float().cpu())
        no_choice.append(n.float().cpu())
    model.train(was_training)
    if not rewards:
        return np.zeros((0, data.item_rows.shape[1]), np.float32), np.zeros(0, np.float32)
    return torch.cat(rewards).numpy(), torch.cat(no_choice).numpy()
