"""Held-out items: a stable split of item ids, and impressions assigned by the items they show.

Early stopping and evaluation must see items the model never trained on, not only unseen
impressions of known items. An item's bucket is a hash of its id, so the split is the same
on every machine and run; an impression goes to the held-out side only when every item it
shows is held out, to the training side only when none is, and is dropped otherwise.
``genshop simulate`` draws each impression's candidates from one pool of the same hash, so
whole impressions fall on one side (pool ``p`` of ``n`` holds buckets ``[p/n, (p+1)/n)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel


def item_bucket(item_id: str) -> float:
    """A stable number in [0, 1) for an item id."""
    digest = hashlib.blake2b(str(item_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def item_pool(item_id: str, pools: int) -> int:
    return min(pools - 1, int(item_bucket(item_id) * pools))


def is_held_out(item_id: str, fraction: float) -> bool:
    return item_bucket(item_id) < fraction


def split_by_items(impression_items: Sequence[Sequence[str]], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, held_out) over impressions; impressions mixing both sides are in neither."""
    held = {}
    train_mask = np.zeros(len(impression_items), dtype=bool)
    held_mask = np.zeros(len(impression_items), dtype=bool)
    for i, items in enumerate(impression_items):
        flags = []
        for item in items:
            if item not in held:
                held[item] = is_held_out(item, fraction)
            flags.append(held[item])
        train_mask[i] = not any(flags)
        held_mask[i] = all(flags)
    return train_mask, held_mask


class SplitSummary(BaseModel):
    """What a split kept, on which side, and what it dropped and why: logged and printed, never silent."""

    requested: Literal["items", "impressions"]
    used: Literal["items", "impressions"]
    train: int
    held_out: int
    dropped: int = 0
    reason: str = ""

    def describe(self) -> str:
        text = f"{self.used} split: {self.train} training and {self.held_out} held-out impressions"
        if self.dropped:
            text += f", {self.dropped} dropped (they show both training and held-out items)"
        return text + (f"; {self.reason}" if self.reason else "")


def plan_split(impression_ids: Sequence[str], impression_items: Sequence[Sequence[str]], split: str, fraction: float,
               min_held_out: int) -> tuple[np.ndarray, np.ndarray, SplitSummary]:
    """Masks (train, held_out) over impressions and what they kept.

    The item split drops impressions that mix both sides. When it would hold out fewer than
    ``min_held_out`` impressions (too few to stop early on), the impression split is used
    instead, and the summary says so."""
    by_impression = np.array([is_held_out(i, fraction) for i in impression_ids], dtype=bool)
    if split == "impressions":
        return ~by_impression, by_impression, SplitSummary(requested="impressions", used="impressions",
                                                           train=int((~by_impression).sum()), held_out=int(by_impression.sum()))
    train, held = split_by_items(impression_items, fraction)
    dropped = int(len(train) - train.sum() - held.sum())
    if held.sum() < min_held_out and by_impression.sum() > held.sum():
        return ~by_impression, by_impression, SplitSummary(
            requested="items", used="impressions", train=int((~by_impression).sum()), held_out=int(by_impression.sum()),
            reason=f"the item split would hold out only {int(held.sum())} impressions (fewer than {min_held_out}) "
                   f"and drop {dropped}, so impressions are split instead")
    return train, held, SplitSummary(requested="items", used="items", train=int(train.sum()), held_out=int(held.sum()),
                                     dropped=dropped)
