"""``genshop audit reward``: which catalog items the reward model scores highest for each group, by attribute.

The catalog is cut into segments by sub category (simulated impressions show one sub category
together), each scored for every group with the brief impressions use for it ("topwear"): a
reward compares items within one brief only. The brief names no gender, so gender is free to
differ between groups as colour, usage and article type are. Each group's top ``top_share`` of
every segment are its top-scored items; a value's share among them is compared with the share
a random pick of the same number from every segment would have (the catalog's share). Values
come from the catalog's own labels; an unknown label counts as the value ``Unknown``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from genshop.audit.report import AUDIT_ATTRIBUTES, AuditReport, GroupAudit
from genshop.audit.shares import disparities, value_shares
from genshop.catalog_data import UNKNOWN, read_catalog
from genshop.embedding import EmbeddingConfig

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


class AuditInputError(ValueError):
    """An audit's input cannot be used; the message names the field."""


class RewardAuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="the group reward model folder")
    catalog: list[Path] = Field(min_length=1, description="labelled catalog parquet (the val split)")
    groups: list[str] = Field(default_factory=list, description="group ids; empty: every group the model knows")
    top_share: float = Field(default=0.1, gt=0, lt=1, description="share of each segment that is 'top-scored'")
    threshold: float = Field(default=0.1, gt=0, lt=1, description="flag disparities of at least this share")
    embedding: EmbeddingConfig | None = Field(default=None, description="default: the one recorded in the model")
    cache_dir: Path | None = None


def catalog_values(frame, attribute: str) -> list[str]:
    """The attribute's label of every row; an unknown label is the value ``Unknown``."""
    return ["Unknown" if value in UNKNOWN else str(value) for value in frame[attribute]]


def audit_groups(model, requested: list[str]) -> list[str]:
    known = [group.id for group in model.config.groups]
    unknown = [g for g in requested if g not in known]
    if unknown:
        raise AuditInputError(f"groups: the reward model knows no group {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(known)}")
    return list(dict.fromkeys(requested)) or known


def audit_reward(config: RewardAuditConfig, progress: ProgressCallback | None = None, features=None) -> AuditReport:
    """``features``: a ``reward.features.FeatureSource`` in place of the model's CLIP (tests, synthetic data)."""
    from reward.brief_scoring import reward_model_id
    from reward.features import EmbedderFeatures
    from reward.model import RewardModel
    from reward.scoring import score_embeddings
    from reward.simulator import brief_text

    report = progress or (lambda stage, done, total: None)
    model = RewardModel.from_pretrained(config.model)
    groups = audit_groups(model, config.groups)
    if features is None:
        embedding = config.embedding or model.config.embedding
        if embedding is None:
            raise AuditInputError(f"model: {config.model} records no embedder; pass an embedding config")
        image_lora = Path(config.model) / model.config.image_lora if model.config.image_lora else None
        features = EmbedderFeatures(embedding, config.catalog, config.cache_dir, image_lora=image_lora)
    frame = read_catalog(config.catalog, with_images=False).reset_index(drop=True)
    embeddings = features.item_embeddings(list(frame["product_id"]), lambda d, t: report("embedding items", d, t))

    segments = list(frame.groupby("sub_category", sort=True).indices.items())
    briefs = [brief_text(sub, "Unknown") for sub, _ in segments]
    brief_embeddings = features.text_embeddings(briefs)
    top: dict[str, list[int]] = {g: [] for g in groups}
    picked = np.zeros(len(frame))  # how many items each row's segment gives each group: the catalog's weights
    for s, ((_, rows), brief) in enumerate(zip(segments, brief_embeddings)):
        k = max(1, math.ceil(config.top_share * len(rows)))
        picked[rows] = k / len(rows)
        for group_id, scores in score_embeddings(model, embeddings[rows], brief, groups).items():
            order = np.lexsort((np.arange(len(rows)), -np.asarray(scores.rewards)))  # best first, ties by position
            top[group_id] += [int(rows[j]) for j in order[:k]]
        report("scoring segments", s + 1, len(segments))

    values = {attribute: catalog_values(frame, attribute) for attribute in AUDIT_ATTRIBUTES}
    catalog_shares = {}
    for attribute, column in values.items():
        weights: dict[str, float] = {}
        for value, weight in zip(column, picked):
            weights[value] = weights.get(value, 0.0) + weight
        catalog_shares[attribute] = {value: w / picked.sum() for value, w in weights.items()}
    model_id = reward_model_id(config.model)
    audits = [GroupAudit(group_id=g, model=model_id, items=len(top[g]), attributes={
        attribute: value_shares([values[attribute][i] for i in top[g]], catalog_shares[attribute])
        for attribute in AUDIT_ATTRIBUTES}) for g in groups]
    flagged = disparities({a.group_id: a.attributes for a in audits}, config.threshold)
    return AuditReport(
        kind="reward", created=datetime.now(timezone.utc), model=model_id, catalog=[str(p) for p in config.catalog],
        catalog_items=len(frame), threshold=config.threshold,
        settings={"top_share": config.top_share, "segments": len(segments), "segment_by": "sub_category"},
        groups=audits, disparities=flagged,
        notes=[f"top-scored: the top {config.top_share:.0%} of each of {len(segments)} sub categories, scored with its brief (e.g. {briefs[0]!r}); the catalog share is a random pick of as many"])
