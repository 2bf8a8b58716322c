"""CLIP features of items and briefs, through the project's embedding interface, cached on disk.

A reward model with a frozen backbone never needs pixels during training: every catalog
item is embedded once and the vectors are cached, keyed by the item and the embedder's
fingerprint (a hash of its config and weight files), so a retrained CLIP never reads a
stale cache. Items are catalog product ids (image bytes from the catalog parquet) or image
file paths (keyed by the file's content hash). Briefs are keyed by their text.

Cache layout: ``<cache_dir>/<fingerprint>/{images,texts}.safetensors``: one ``embeddings``
tensor ``[n, dim]`` and the keys, in order, as JSON in the safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image

from genshop.catalog_data import decode_image
from genshop.embedding import Embedder, EmbeddingConfig, embedder_fingerprint, load_embedder

ProgressCallback = Callable[[int, int], None]  # (done, total)


class FeatureSource(Protocol):
    """Where a reward model's inputs come from: unit-length image and brief embeddings."""

    dim: int
    logit_scale: float

    def item_embeddings(self, items: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray: ...

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray: ...


class EmbeddingCache:
    """A key → vector store in one safetensors file; missing keys are computed and appended."""

    def __init__(self, path: Path):
        self.path = path
        self._keys: list[str] = []
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                self._keys = json.loads(f.metadata()["keys"])
                self._vectors = f.get_tensor("embeddings").numpy()
        self._row = {key: i for i, key in enumerate(self._keys)}

    def get(self, keys: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        missing = list(dict.fromkeys(key for key in keys if key not in self._row))
        if missing:
            vectors = np.asarray(compute(missing), dtype=np.float32)
            self._vectors = vectors if not len(self._keys) else np.concatenate([self._vectors, vectors])
            for key in missing:
                self._row[key] = len(self._keys)
                self._keys.append(key)
            self._save()
        return self._vectors[[self._row[key] for key in keys]]

    def _save(self) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        save_file({"embeddings": torch.from_numpy(np.ascontiguousarray(self._vectors))}, str(tmp),
                  metadata={"keys": json.dumps(self._keys)})
        tmp.replace(self.path)


class CatalogImages:
    """Images of items: catalog product ids (JPEG bytes in the parquet files) or image file paths."""

    def __init__(self, catalog: Sequence[str | Path] = ()):
        frames = [pd.read_parquet(path, columns=["product_id", "image"]) for path in catalog]
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["product_id", "image"])
        self._bytes = dict(zip(frame["product_id"].astype(str), frame["image"]))

    def __contains__(self, item: str) -> bool:
        return item in self._bytes

    @property
    def product_ids(self) -> set[str]:
        return set(self._bytes)

    def key(self, item: str) -> str:
        if item in self._bytes:
            return f"product:{item}"
        path = Path(item)
        if not path.is_file():
            raise KeyError(f"item {item!r} is neither a catalog product id nor an image file")
        return f"file:{hashlib.sha256(path.read_bytes()).hexdigest()}"

    def image(self, item: str) -> Image.Image:
        if item in self._bytes:
            return decode_image(self._bytes[item])
        return Image.open(item).convert("RGB")


class EmbedderFeatures:
    """The real feature source: a CLIP embedder (any backend) with an on-disk cache."""

    def __init__(self, embedding: EmbeddingConfig, catalog: Sequence[str | Path] = (),
                 cache_dir: str | Path | None = None, embedder: Embedder | None = None,
                 image_lora: str | Path | None = None):
        """``image_lora``: a ``reward.clip_lora`` adapter folder to put on the image tower (its own cache)."""
        self.embedding = embedding
        self.fingerprint = embedder_fingerprint(embedding)
        self.embedder = embedder or load_embedder(embedding)
        if image_lora is not None:
            from reward.clip_lora import load_image_lora, lora_fingerprint

            load_image_lora(self.embedder, image_lora)
            self.fingerprint = lora_fingerprint(self.fingerprint, image_lora)
        self.logit_scale = float(self.embedder.logit_scale)
        self.images = CatalogImages(catalog)
        folder = Path(cache_dir) / self.fingerprint if cache_dir else None
        self._image_cache = EmbeddingCache(folder / "images.safetensors") if folder else None
        self._text_cache = EmbeddingCache(folder / "texts.safetensors") if folder else None
        self.dim = int(self.embedder.embed_texts(["a photo"]).shape[1])

    def item_embeddings(self, items: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        keys = [self.images.key(item) for item in items]
        item_of_key = dict(zip(keys, items))

        def compute(missing: list[str]) -> np.ndarray:
            chunks, done = [], 0
            for start in range(0, len(missing), 1024):
                batch = missing[start:start + 1024]
                chunks.append(self.embedder.embed_images([self.images.image(item_of_key[k]) for k in batch]))
                done += len(batch)
                if progress:
                    progress(done, len(missing))
            return np.concatenate(chunks)

        if self._image_cache is None:
            return compute(keys)
        return self._image_cache.get(keys, compute)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        if self._text_cache is None:
            return self.embedder.embed_texts(list(texts))
        keys = [f"text:{hashlib.sha256(t.encode('utf-8')).hexdigest()}" for t in texts]
        text_of_key = dict(zip(keys, texts))
        return self._text_cache.get(keys, lambda missing: self.embedder.embed_texts([text_of_key[k] for k in missing]))
