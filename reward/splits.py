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

import numpy as np


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
