"""A synthetic catalog and synthetic CLIP-like features, for tests and demos without a trained CLIP.

``write_synthetic_catalog`` writes a small catalog parquet in the real catalog's columns
(tiny JPEGs tinted with the item's colour). ``SyntheticFeatures`` is a ``FeatureSource``
whose vectors encode words: an item's embedding is the normalised sum of fixed random
vectors of the words of its attribute values plus noise, a text's embedding the normalised
sum of its words' vectors, so "red" in a brief points where red items are, as in CLIP.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

COLOURS = {"Black": (20, 20, 20), "White": (245, 245, 245), "Red": (200, 30, 30), "Pink": (240, 150, 180),
           "Navy Blue": (20, 30, 90), "Gold": (210, 170, 50), "Yellow": (240, 220, 40), "Grey": (128, 128, 128)}
ARTICLES = {  # article_type: (master_category, sub_category, usage, genders)
    "Tshirts": ("Apparel", "Topwear", "Casual", ("Men", "Women")),
    "Shirts": ("Apparel", "Topwear", "Formal", ("Men",)),
    "Kurtas": ("Apparel", "Topwear", "Ethnic", ("Men", "Women")),
    "Tops": ("Apparel", "Topwear", "Party", ("Women",)),
    "Sports Shoes": ("Footwear", "Shoes", "Sports", ("Men", "Women")),
    "Formal Shoes": ("Footwear", "Shoes", "Formal", ("Men",)),
    "Heels": ("Footwear", "Shoes", "Party", ("Women",)),
    "Casual Shoes": ("Footwear", "Shoes", "Casual", ("Men", "Women")),
}
ATTRIBUTE_COLUMNS = ("gender", "master_category", "sub_category", "article_type", "colour", "usage")


def synthetic_catalog(n: int, seed: int = 0, id_offset: int = 0) -> pd.DataFrame:
    """``n`` items with random attributes from small vocabularies, and a tinted 12×16 JPEG each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        article = list(ARTICLES)[rng.integers(len(ARTICLES))]
        master, sub, usage, genders = ARTICLES[article]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        gender = genders[rng.integers(len(genders))]
        buffer = io.BytesIO()
        Image.new("RGB", (12, 16), COLOURS[colour]).save(buffer, format="JPEG")
        rows.append({"product_id": str(id_offset + i), "title": f"{gender} {colour} {article}", "gender": gender,
                     "master_category": master, "sub_category": sub, "article_type": article, "colour": colour,
                     "usage": usage, "image": buffer.getvalue()})
    return pd.DataFrame(rows)


def write_synthetic_catalog(path: str | Path, n: int, seed: int = 0, id_offset: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_catalog(n, seed, id_offset).to_parquet(path, index=False)
    return path


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class SyntheticFeatures:
    """A ``FeatureSource`` over catalog items whose vectors are sums of per-word random vectors."""

    def __init__(self, catalog: Sequence[str | Path] | pd.DataFrame, dim: int = 32, noise: float = 0.05,
                 seed: int = 0, logit_scale: float = 10.0):
        frame = catalog if isinstance(catalog, pd.DataFrame) else pd.concat(
            [pd.read_parquet(path) for path in catalog], ignore_index=True)
        self.attributes = {str(row["product_id"]): " ".join(str(row[c]) for c in ATTRIBUTE_COLUMNS)
                           for row in frame.to_dict("records")}
        self.dim, self.noise, self.seed, self.logit_scale = dim, noise, seed, logit_scale

    def _word(self, word: str) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "big")).standard_normal(self.dim)

    def _text(self, text: str, noise_key: str | None = None) -> np.ndarray:
        vector = sum((self._word(w) for w in _words(text)), np.zeros(self.dim))
        if noise_key is not None and self.noise:
            digest = hashlib.sha256(f"noise:{self.seed}:{noise_key}".encode()).digest()
            vector = vector + self.noise * np.sqrt(len(_words(text))) * np.random.default_rng(
                int.from_bytes(digest[:8], "big")).standard_normal(self.dim) * np.sqrt(self.dim) / 4
        return vector / max(np.linalg.norm(vector), 1e-12)

    def item_embeddings(self, items: Sequence[str], progress=None) -> np.ndarray:
        vectors = np.stack([self._text(self.attributes[item], noise_key=item) for item in items]).astype(np.float32)
        if progress:
            progress(len(items), len(items))
        return vectors

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._text(text) for text in texts]).astype(np.float32)
