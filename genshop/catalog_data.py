"""The product catalog as training data: parquet rows → listing texts and a cached image tensor.

A catalog parquet holds one product per row: ``title``, the taxonomy columns
(``TAXONOMY_COLUMNS``) and ``image`` (JPEG bytes). This module reads it, builds the
text that describes a listing (its title plus attribute phrases taken from the
taxonomy), and decodes every image once into a ``uint8`` tensor, preprocessed the way
the model's ``preprocess_cfg`` says and cached as safetensors next to the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

TAXONOMY_COLUMNS = ("gender", "master_category", "sub_category", "article_type", "colour", "usage")
TEXT_COLUMNS = ("product_id", "title", *TAXONOMY_COLUMNS)
UNKNOWN = {"", "Unknown", "NA", "None"}

ProgressCallback = Callable[[int, int], None]  # (done, total)


def read_catalog(paths: Sequence[str | Path], with_images: bool = True) -> pd.DataFrame:
    """Rows of one or more catalog parquet files, in file order, with a fresh 0..n-1 index."""
    columns = [*TEXT_COLUMNS, "image"] if with_images else list(TEXT_COLUMNS)
    frames = [pd.read_parquet(path, columns=columns) for path in paths]
    frame = pd.concat(frames, ignore_index=True)
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].fillna("").astype(str).str.strip()
    return frame


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# ---------------------------------------------------------------- listing texts

def attribute_phrases(row: dict) -> list[str]:
    """Short phrases naming the listing's taxonomy, e.g. ``["tshirts", "topwear", "black colour", "for men"]``."""
    phrases = [row["article_type"], row["sub_category"], row["master_category"], f"{row['colour']} colour"]
    if row["gender"] not in UNKNOWN:
        phrases.append(f"for {row['gender']}")
    if row["usage"] not in UNKNOWN:
        phrases.append(f"{row['usage']} wear")
    return [p for p in phrases if p.split()[0] not in UNKNOWN]


def listing_text(row: dict) -> str:
    """The canonical text of a listing: its title followed by every attribute phrase."""
    return f"{row['title']}. " + ", ".join(attribute_phrases(row))


CAPTION_PREFIXES = ("", "a photo of ", "a product photo of ", "an image of ")


def attribute_caption(row: dict, rng: random.Random) -> str:
    """A caption made of taxonomy only, in the words a shopper or a zero-shot prompt would use.

    Half name a single attribute ("a photo of footwear", "navy blue colour"), the rest
    combine a few ("a photo of black casual shoes for men"), so every label's words are
    trained both alone and in context.
    """
    colour, article = row["colour"], row["article_type"]
    gender = "" if row["gender"] in UNKNOWN else f" for {row['gender']}"
    prefix = rng.choice(CAPTION_PREFIXES)
    single = [f"{prefix}{article}", f"{prefix}{row['master_category']}", f"{prefix}{row['sub_category']}",
              f"{colour} colour", f"{prefix}a {colour} product", f"{prefix}{colour}"]
    combined = [f"{prefix}{colour} {article}{gender}", f"{prefix}{colour} {article}",
                f"{article}, {row['sub_category']}, {row['master_category']}", f"{prefix}{article}{gender}",
                f"{prefix}{colour} {row['sub_category']}", f"{prefix}{row['usage']} {article}"]
    return rng.choice(single if rng.random() < 0.5 else combined)


def sample_caption(row: dict, rng: random.Random, title_only: float = 0.3, attributes_only: float = 0.2) -> str:
    """One training caption: the bare title, a taxonomy caption, or the title with a random subset of phrases."""
    r = rng.random()
    if r < title_only:
        return row["title"]
    if r < title_only + attributes_only:
        return attribute_caption(row, rng)
    phrases = attribute_phrases(row)
    rng.shuffle(phrases)
    return f"{row['title']}. " + ", ".join(phrases[: rng.randint(1, len(phrases))])


# ---------------------------------------------------------------- images

def uint8_transform(preprocess_cfg: dict) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform for this ``preprocess_cfg`` without its final Normalize, as uint8 CHW."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    steps = transform.transforms[:-1]  # everything up to ToTensor; Normalize is applied per batch

    def to_uint8(image: Image.Image) -> torch.Tensor:
        for step in steps:
            image = step(image)
        return (image * 255).round().to(torch.uint8)

    return to_uint8


def image_tensor(frame: pd.DataFrame, preprocess_cfg: dict, progress: ProgressCallback | None = None) -> torch.Tensor:
    """Decode and preprocess every row's image into one ``uint8`` tensor ``[n, 3, size, size]``."""
    to_uint8 = uint8_transform(preprocess_cfg)
    images = []
    for i, data in enumerate(frame["image"]):
        images.append(to_uint8(decode_image(data)))
        if progress and (i + 1) % 1024 == 0:
            progress(i + 1, len(frame))
    if progress:
        progress(len(frame), len(frame))
    return torch.stack(images)


def _cache_key(paths: Sequence[str | Path], preprocess_cfg: dict) -> str:
    digest = hashlib.sha256(json.dumps(preprocess_cfg, sort_keys=True).encode())
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_image_tensor(paths: Sequence[str | Path], frame: pd.DataFrame, preprocess_cfg: dict,
                        cache_dir: str | Path | None, progress: ProgressCallback | None = None) -> torch.Tensor:
    """``image_tensor`` of the catalog, read from / written to ``cache_dir`` as safetensors."""
    from safetensors.torch import load_file, save_file

    if cache_dir is None:
        return image_tensor(frame, preprocess_cfg, progress)
    cache = Path(cache_dir) / f"images-{_cache_key(paths, preprocess_cfg)}.safetensors"
    if cache.is_file():
        images = load_file(cache)["images"]
        if len(images) == len(frame):
            return images
    images = image_tensor(frame, preprocess_cfg, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file({"images": images.contiguous()}, str(tmp))
    tmp.replace(cache)
    return images


def embed_catalog_images(embedder, frame: pd.DataFrame, progress: ProgressCallback | None = None,
                         chunk: int = 2048) -> np.ndarray:
    """Unit-length embeddings of every row's image, decoded a chunk at a time (bounded memory)."""
    parts = []
    for start in range(0, len(frame), chunk):
        images = [decode_image(data) for data in frame["image"].iloc[start:start + chunk]]
        parts.append(embedder.embed_images(images))
        if progress:
            progress(min(start + chunk, len(frame)), len(frame))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def rows_as_dicts(frame: pd.DataFrame) -> list[dict]:
    return frame[list(TEXT_COLUMNS)].to_dict("records")


def label_array(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame[column].to_numpy(dtype=object)
