"""Evaluate any CLIP behind the embedding interface on a catalog split.

- Zero-shot categorization: every label of a taxonomy column becomes a class; its text
  embedding is the mean of the embeddings of several prompt templates (CLIP's prompt
  ensembling), re-normalised; an image gets the class with the highest cosine.
  Reported: master-category accuracy, article-type accuracy and support-weighted F1,
  colour accuracy.
- With a label prior (``prior_data``: a labelled catalog, normally the train split, of
  which only the label frequencies are read): a contrastive model's logit
  ``logit_scale * cos(image, text)`` estimates log p(image | label) / p(image) up to a
  constant, so Bayes' rule gives the posterior by adding log p(label). Without it, rare
  labels ("Charcoal", "Free Items") win far too often. The plain zero-shot numbers are
  reported beside, with the suffix ``_no_prior``.
- Text→image retrieval: each listing's title is a query against every image of the
  split; the listing's own image is the one correct answer (titles shared by several
  listings therefore cap the score). Reported: R@1, R@10, MRR; and, for information,
  the same with any image whose listing has the identical title counted as correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from genshop.catalog_data import embed_catalog_images, read_catalog
from genshop.embedding import Embedder, EmbeddingConfig, load_embedder

PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "master_category": ("a photo of {}.", "a product photo of {}.", "{}", "an image of {}.", "{} products"),
    "article_type": ("a photo of {}.", "a product photo of {}.", "{}", "an image of {}.", "a photo of {} for sale."),
    "colour": ("a photo of a {} product.", "a {} product", "{} colour", "{}", "an image of a {} item."),
}

TARGETS = {"master_category_accuracy": 0.97, "article_type_weighted_f1": 0.75, "colour_accuracy": 0.65,
           "retrieval_mrr": 0.5}

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


class ClipEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding: EmbeddingConfig
    data: list[Path] = Field(min_length=1)
    max_rows: int | None = Field(default=None, ge=1, description="evaluate on the first rows only (smoke tests)")
    prior_data: list[Path] = Field(default_factory=list, description="catalog parquet whose label frequencies are "
                                                                    "the zero-shot label prior (the train split)")


class ClipEvalReport(BaseModel):
    model: str
    backend: str
    rows: int
    metrics: dict[str, float]
    targets: dict[str, float] = Field(default_factory=lambda: dict(TARGETS))

    def passed(self) -> dict[str, bool]:
        return {name: self.metrics[name] >= target for name, target in self.targets.items() if name in self.metrics}


# ---------------------------------------------------------------- metrics (pure functions)

def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    return float((y_true == y_pred).mean()) if len(y_true) else 0.0


def weighted_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """F1 per true class, averaged with weights = the class's support (sklearn's ``average='weighted'``)."""
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    total = 0.0
    for label in np.unique(y_true):
        true_pos = np.sum((y_true == label) & (y_pred == label))
        predicted, support = np.sum(y_pred == label), np.sum(y_true == label)
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += f1 * support
    return float(total / len(y_true)) if len(y_true) else 0.0


def retrieval_ranks(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray,
                    relevant: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of the best relevant gallery item for each query (ties counted against the query).

    ``relevant[i, j]`` says gallery item j answers query i; by default only item i does.
    """
    similarity = query_embeddings @ gallery_embeddings.T
    if relevant is None:
        relevant = np.eye(len(query_embeddings), len(gallery_embeddings), dtype=bool)
    best = np.where(relevant, similarity, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((similarity >= best) & ~relevant).sum(axis=1)


def retrieval_metrics(ranks: np.ndarray, prefix: str = "retrieval_") -> dict[str, float]:
    return {f"{prefix}r@1": float((ranks <= 1).mean()), f"{prefix}r@10": float((ranks <= 10).mean()),
            f"{prefix}mrr": float((1.0 / ranks).mean())}


def zero_shot_classifier(embedder: Embedder, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One unit vector per label: the re-normalised mean embedding of the label in every template."""
    texts = [template.format(label) for label in labels for template in templates]
    embeddings = embedder.embed_texts(texts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def label_log_prior(known_labels: Sequence[str], labels: Sequence[str], smoothing: float = 1.0) -> np.ndarray:
    """log p(label) for each of ``labels`` from their frequency in ``known_labels``, add-``smoothing``."""
    values, counts = np.unique(np.asarray(known_labels, dtype=object), return_counts=True)
    frequency = dict(zip(values.tolist(), counts.tolist()))
    smoothed = np.array([frequency.get(label, 0) + smoothing for label in labels], dtype=np.float64)
    return np.log(smoothed / smoothed.sum())


def zero_shot_predict(image_embeddings: np.ndarray, class_embeddings: np.ndarray, labels: Sequence[str],
                      logit_scale: float = 1.0, log_prior: np.ndarray | None = None) -> list[str]:
    """The label with the highest logit, plus ``log_prior`` (the Bayes posterior) when given."""
    logits = logit_scale * image_embeddings @ class_embeddings.T
    if log_prior is not None:
        logits = logits + log_prior
    return [labels[i] for i in logits.argmax(axis=1)]


# ---------------------------------------------------------------- the job

def evaluate_clip(config: ClipEvalConfig, progress: ProgressCallback | None = None) -> ClipEvalReport:
    report = progress or (lambda stage, done, total: None)
    frame = read_catalog(config.data)
    if config.max_rows:
        frame = frame.iloc[: config.max_rows]
    embedder = load_embedder(config.embedding)
    image_embeddings = embed_catalog_images(embedder, frame, lambda d, t: report("embedding images", d, t))

    prior_frame = read_catalog(config.prior_data, with_images=False) if config.prior_data else None
    metrics: dict[str, float] = {}
    for column, templates in PROMPT_TEMPLATES.items():
        labels = sorted(set(frame[column]))
        classes = zero_shot_classifier(embedder, labels, templates)
        predictions = {"_no_prior": zero_shot_predict(image_embeddings, classes, labels)}
        if prior_frame is not None:
            predictions = {"": zero_shot_predict(image_embeddings, classes, labels, embedder.logit_scale,
                                                 label_log_prior(prior_frame[column], labels)), **predictions}
        for suffix, predicted in predictions.items():
            metrics[f"{column}_accuracy{suffix}"] = accuracy(frame[column], predicted)
            metrics[f"{column}_weighted_f1{suffix}"] = weighted_f1(frame[column], predicted)
        report(f"zero-shot {column}", 1, 1)

    title_embeddings = embedder.embed_texts(list(frame["title"]), lambda d, t: report("embedding titles", d, t))
    metrics.update(retrieval_metrics(retrieval_ranks(title_embeddings, image_embeddings)))
    titles = frame["title"].str.lower().to_numpy()
    same_title = titles[:, None] == titles[None, :]  # any listing with the very same title is a right answer
    metrics.update(retrieval_metrics(retrieval_ranks(title_embeddings, image_embeddings, same_title),
                                     prefix="retrieval_any_same_title_"))
    return ClipEvalReport(model=config.embedding.model, backend=embedder.backend, rows=len(frame), metrics=metrics)
