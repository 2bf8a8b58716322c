"""``genshop understand fit``: top-tuned heads and calibration temperatures from a labelled catalog.

The labelled catalog's images are embedded once with the frozen CLIP. A held-out share
of rows (``calibration_share``) is kept aside; linear heads are fitted on the rest, then
one temperature per output is fitted on the held-out rows, for the heads and for the
zero-shot classifier of the same CLIP. Output folder::

    heads.safetensors, heads_config.json   the top-tuned heads (``LinearHeads``)
    zero_shot_calibration.json             temperatures of the zero-shot classifier
    fusion.safetensors, fusion_config.json the multimodal product vector (``fusion.ProductFusion``)
    fit_config.json
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from genshop.catalog_data import embed_catalog_images, read_catalog
from genshop.embedding import EmbeddingConfig, load_embedder
from genshop.settings import DEFAULT_TAXONOMY
from genshop.understanding.categorize import (ZeroShotClassifier, calibrate, fit_linear_heads, label_targets,
                                              output_labels)
from genshop.understanding.fusion import fit_fusion, modality_embeddings
from genshop.understanding.taxonomy import load_taxonomy

ZERO_SHOT_CALIBRATION = "zero_shot_calibration.json"

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


class FitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding: EmbeddingConfig
    data: list[Path] = Field(min_length=1, description="labelled catalog parquet (the train split)")
    out_dir: Path
    taxonomy: Path = DEFAULT_TAXONOMY
    calibration_share: float = Field(default=0.15, gt=0, lt=1)
    max_rows: int | None = Field(default=None, ge=10)
    seed: int = 0


def load_zero_shot_temperatures(folder: str | Path | None) -> dict[str, float]:
    path = None if folder is None else Path(folder) / ZERO_SHOT_CALIBRATION
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def catalog_modalities(embedder, frame, image_embeddings: np.ndarray, taxonomy) -> dict[str, np.ndarray]:
    """The product vector's modalities of catalog rows, the attributes being the taxonomy's families."""
    families = [family.name for family in taxonomy.attributes if family.name in frame.columns]
    return modality_embeddings(embedder, image_embeddings, frame["title"], frame[families].to_dict("records"))


def fit_understanding(config: FitConfig, progress: ProgressCallback | None = None) -> Path:
    report = progress or (lambda stage, done, total: None)
    taxonomy = load_taxonomy(config.taxonomy)
    frame = read_catalog(config.data)
    if config.max_rows:
        frame = frame.sample(n=min(config.max_rows, len(frame)), random_state=config.seed)
    embedder = load_embedder(config.embedding)
    embeddings = embed_catalog_images(embedder, frame, lambda d, t: report("embedding images", d, t))

    order = np.random.default_rng(config.seed).permutation(len(frame))
    held_out = order[: max(1, int(config.calibration_share * len(frame)))]
    fit_rows = order[len(held_out):]
    names = [name for name in output_labels(taxonomy) if name in frame.columns]

    def labelled(rows: np.ndarray) -> dict[str, list[str]]:
        return {name: frame[name].iloc[rows].tolist() for name in names}

    report("fitting heads", 0, 1)
    heads = fit_linear_heads(embeddings[fit_rows], labelled(fit_rows), taxonomy, seed=config.seed)
    report("fitting heads", 1, 1)
    calibrate(heads, embeddings[held_out], labelled(held_out))
    zero_shot = ZeroShotClassifier(embedder, taxonomy)
    zero_shot_temperatures = calibrate(zero_shot, embeddings[held_out], labelled(held_out))
    report("calibrating", 1, 1)

    report("fitting the product vector", 0, 1)
    modalities = catalog_modalities(embedder, frame, embeddings, taxonomy)
    fusion = fit_fusion({m: v[fit_rows] for m, v in modalities.items()},
                        label_targets(frame["article_type"].iloc[fit_rows], zero_shot.labels["article_type"]),
                        zero_shot.class_embeddings["article_type"], embedder.logit_scale, seed=config.seed)
    report("fitting the product vector", 1, 1)

    out_dir = heads.save_pretrained(config.out_dir)
    fusion.save_pretrained(out_dir)
    (out_dir / ZERO_SHOT_CALIBRATION).write_text(json.dumps(zero_shot_temperatures, indent=2), encoding="utf-8")
    (out_dir / "fit_config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    return out_dir
