"""``genshop understand eval``: categorization and attributes on a labelled split, zero-shot vs top-tuned.

Both classifiers run through ``understand`` (hierarchical, calibrated), so the numbers are
those of the product's enrich stage. Per classifier:

- accuracy at each taxonomy level and article-type weighted F1 (every item, no abstaining);
- accuracy per attribute family, over the rows whose true value is known and whose true
  master category the family applies to;
- article-type calibration: expected calibration error of the confidence, and at the
  abstain threshold the coverage (share answered) and the accuracy of the answered ones.

And category → product retrieval (each article type's prompt-ensemble text embedding is a
query over the split; mean average precision) with the image embedding alone, and with
the multimodal product vector of the understanding folder (image, title, attributes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from genshop.catalog_data import embed_catalog_images, read_catalog
from genshop.embedding import EmbeddingConfig, load_embedder
from genshop.evaluation.clip_eval import accuracy, weighted_f1
from genshop.metrics import expected_calibration_error
from genshop.understanding.categorize import (
    HIERARCHY,
    ItemUnderstanding,
    LinearHeads,
    ZeroShotClassifier,
    understand,
)
from genshop.understanding.fitting import DEFAULT_TAXONOMY, catalog_modalities, load_zero_shot_temperatures
from genshop.understanding.fusion import FUSION_CONFIG, ProductFusion, category_retrieval_map
from genshop.understanding.taxonomy import LEVELS, UNKNOWN_VALUES, Taxonomy, load_taxonomy

ProgressCallback = Callable[[str, int, int], None]


class UnderstandingEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding: EmbeddingConfig
    data: list[Path] = Field(min_length=1)
    taxonomy: Path = DEFAULT_TAXONOMY
    heads: Path | None = Field(default=None, description="folder from `genshop understand fit` (adds top-tuned)")
    abstain_below: float = Field(default=0.5, ge=0, le=1)
    max_rows: int | None = Field(default=None, ge=1)


class UnderstandingEvalReport(BaseModel):
    model: str
    rows: int
    abstain_below: float
    metrics: dict[str, dict[str, float]] = Field(description="classifier kind → metric → value")
    retrieval: dict[str, float] = Field(default_factory=dict, description="category → product mAP per vector")


def understanding_metrics(items: list[ItemUnderstanding], abstain_below: float, frame,
                          taxonomy: Taxonomy) -> dict[str, float]:
    """``items``: predictions with abstaining off. Confidences shrink down the path (nested marginals), so
    the article type is answered at the product's threshold exactly when its confidence reaches it."""
    metrics: dict[str, float] = {}
    for level in LEVELS:
        predicted = [getattr(item, level).label for item in items]
        metrics[f"{level}_accuracy"] = accuracy(frame[level], predicted)
    metrics["article_type_weighted_f1"] = weighted_f1(frame["article_type"], [i.article_type.label for i in items])
    for family in taxonomy.attributes:
        truth = frame[family.name].to_numpy(dtype=object) if family.name in frame else None
        if truth is None:
            continue
        rows = [i for i, (value, master) in enumerate(zip(truth, frame["master_category"]))
                if value not in UNKNOWN_VALUES and family.applies(master) and family.name in items[i].attributes]
        predicted = [items[i].attributes[family.name].label for i in rows]
        metrics[f"{family.name}_accuracy"] = accuracy(truth[rows], predicted)
    correct = np.array([item.article_type.label == truth for item, truth in zip(items, frame["article_type"])])
    confidence = np.array([item.article_type.confidence for item in items])
    metrics["article_type_ece"] = expected_calibration_error(confidence, correct)
    answered = confidence >= abstain_below
    metrics["article_type_coverage"] = float(answered.mean())
    metrics["article_type_selective_accuracy"] = float(correct[answered].mean()) if answered.any() else 0.0
    return metrics


def evaluate_understanding(config: UnderstandingEvalConfig,
                           progress: ProgressCallback | None = None) -> UnderstandingEvalReport:
    report = progress or (lambda stage, done, total: None)
    taxonomy = load_taxonomy(config.taxonomy)
    frame = read_catalog(config.data)
    if config.max_rows:
        frame = frame.iloc[: config.max_rows]
    embedder = load_embedder(config.embedding)
    embeddings = embed_catalog_images(embedder, frame, lambda d, t: report("embedding images", d, t))
    classifiers = [ZeroShotClassifier(embedder, taxonomy, load_zero_shot_temperatures(config.heads))]
    if config.heads is not None:
        classifiers.append(LinearHeads.from_pretrained(config.heads, taxonomy))
    metrics = {}
    for classifier in classifiers:
        log_posteriors = classifier.log_posteriors(embeddings)
        temperature = classifier.temperatures.get(HIERARCHY, 1.0)
        items = understand(log_posteriors, taxonomy, abstain_below=0.0, hierarchy_temperature=temperature)
        metrics[classifier.kind] = understanding_metrics(items, config.abstain_below, frame, taxonomy)
        report(classifier.kind, 1, 1)
    classes, labels = classifiers[0].class_embeddings["article_type"], classifiers[0].labels["article_type"]
    retrieval = {"image_map": category_retrieval_map(embeddings, frame["article_type"], classes, labels)}
    if config.heads is not None and (config.heads / FUSION_CONFIG).is_file():
        fusion = ProductFusion.from_pretrained(config.heads)
        modalities = catalog_modalities(embedder, frame, embeddings, taxonomy)
        retrieval["product_vector_map"] = category_retrieval_map(fusion.fuse(modalities), frame["article_type"],
                                                                 classes, labels)
        without_title = fusion.fuse({m: v for m, v in modalities.items() if m != "title"})
        retrieval["product_vector_without_title_map"] = category_retrieval_map(without_title, frame["article_type"],
                                                                               classes, labels)
    return UnderstandingEvalReport(model=config.embedding.model, rows=len(frame), abstain_below=config.abstain_below,
                                   metrics=metrics, retrieval=retrieval)
