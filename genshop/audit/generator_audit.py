"""``genshop audit generator``: what the generator makes for each group, by attribute, read by the
understanding heads.

Every brief of a briefs file (default: the held-out tuning briefs, whose colour is left to the
generator) is made ``variants`` times for each group, as workers make it: the group's LoRA
switched in when ``GENSHOP_ADAPTERS`` has one, else the base model (groups without one share the
base images, made once). Each image's article type, colour, usage and gender are read by the
understanding's top-tuned heads (``genshop understand fit``; not the evaluation-only judge), as
the enrich stage reads them; a reading below ``abstain_below`` counts as unread. The catalog's
share is, per brief, the share among the catalog products with the attributes the brief names
(all products when none has them), averaged over the briefs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from genshop.audit.report import AUDIT_ATTRIBUTES, AuditReport, GroupAudit
from genshop.audit.reward_audit import AuditInputError, catalog_values
from genshop.audit.shares import disparities, value_shares
from genshop.embedding import EmbeddingConfig
from genshop.settings import DEFAULT_TAXONOMY, REPO_ROOT

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)
DEFAULT_BRIEFS = REPO_ROOT / "configs" / "tuning" / "briefs-heldout.yaml"


class GeneratorAuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: list[str] = Field(min_length=1)
    catalog: list[Path] = Field(min_length=1, description="labelled catalog parquet (the val split)")
    embedding: EmbeddingConfig = Field(description="the understanding's CLIP")
    understanding: Path = Field(description="folder from `genshop understand fit` with the top-tuned heads")
    briefs: Path = DEFAULT_BRIEFS
    preset: str | None = None
    variants: int = Field(default=4, ge=1, le=64)
    steps: int | None = Field(default=None, ge=1)
    seed: int = 0
    threshold: float = Field(default=0.1, gt=0, lt=1)
    abstain_below: float = Field(default=0.5, ge=0, le=1)
    taxonomy: Path = DEFAULT_TAXONOMY


def catalog_reference(frame, briefs) -> dict[str, dict[str, float]]:
    """Per attribute, the catalog's share of each value among the products each brief names, averaged over briefs."""
    reference: dict[str, dict[str, float]] = {a: {} for a in AUDIT_ATTRIBUTES}
    for brief in briefs:
        match = frame
        for attribute in AUDIT_ATTRIBUTES:
            named = getattr(brief, attribute, None)
            if named and (match[attribute] == named).any():
                match = match[match[attribute] == named]
        for attribute in AUDIT_ATTRIBUTES:
            column = catalog_values(match, attribute)
            for value in set(column):
                share = column.count(value) / len(column) / len(briefs)
                reference[attribute][value] = reference[attribute].get(value, 0.0) + share
    return reference


def read_attributes(understood) -> dict[str, str | None]:
    """The audited attributes of one image as the understanding reads them (None: abstained or not applicable)."""
    values = {"article_type": understood.article_type.label}
    for attribute in AUDIT_ATTRIBUTES[:3]:
        score = understood.attributes.get(attribute)
        values[attribute] = score.label if score is not None else None
    return values


def audit_generator(config: GeneratorAuditConfig, progress: ProgressCallback | None = None) -> AuditReport:
    from genshop.adapters import use_group
    from genshop.catalog_data import read_catalog
    from genshop.enrichment import EnrichConfig, load_enricher, understand_images
    from genshop.generation import generate_batch, plan_batches
    from genshop.pipelines import load_pipeline
    from genshop.presets import load_preset
    from genshop.settings import get_settings
    from genshop.tuning.tune import load_tune_briefs
    from genshop.understanding.categorize import HEADS_CONFIG

    report = progress or (lambda stage, done, total: None)
    if not (config.understanding / HEADS_CONFIG).is_file():
        raise AuditInputError(f"understanding: {config.understanding} holds no top-tuned heads ({HEADS_CONFIG}); "
                              "make them with `genshop understand fit`")
    settings = get_settings()
    preset = load_preset(config.preset or settings.preset)
    briefs = load_tune_briefs(config.briefs, preset, config.seed, steps=config.steps, variants=config.variants)
    frame = read_catalog(config.catalog, with_images=False)
    enricher = load_enricher(EnrichConfig(embedding=config.embedding, index_dir=settings.index_dir,
                                          taxonomy=config.taxonomy, understanding=config.understanding,
                                          classifier="top-tuned", abstain_below=config.abstain_below))
    loaded = load_pipeline(preset)
    tuned = [g for g in config.groups if g in loaded.adapters]
    makers = list(dict.fromkeys(g if g in tuned else None for g in config.groups))  # None: the base model
    total = len(makers) * sum(b.variants for b in briefs)
    readings: dict[str | None, list[dict[str, str | None]]] = {}
    done = 0
    for maker in makers:
        readings[maker] = []
        for brief in briefs:
            brief = brief.model_copy(update={"groups": [maker] if maker else []})
            for adapter, variants in plan_batches(brief, preset.defaults.batch_size, frozenset(tuned)):
                use_group(loaded.pipeline, adapter, loaded.adapters)
                images = [g.image for g in generate_batch(loaded, brief, variants)]
                _, understood = understand_images(enricher, images)
                readings[maker] += [read_attributes(u) for u in understood]
                done += len(variants)
                report("generating and reading", done, total)

    reference = catalog_reference(frame, briefs)
    audits = []
    for group in config.groups:
        read = readings[group if group in tuned else None]
        audits.append(GroupAudit(
            group_id=group, model=loaded.identity(group if group in tuned else None)[0], items=len(read),
            attributes={a: value_shares([r[a] for r in read if r[a] is not None], reference[a]) for a in AUDIT_ATTRIBUTES},
            unread={a: sum(r[a] is None for r in read) for a in AUDIT_ATTRIBUTES}))
    notes = [f"{len(briefs)} briefs from {config.briefs.name} x {config.variants} variants per group, "
             f"{briefs[0].steps} steps, seeds from {config.seed}; attributes read by the top-tuned heads of "
             f"{config.understanding} (abstaining below {config.abstain_below})"]
    if untuned := [g for g in config.groups if g not in tuned]:
        notes.append(f"no LoRA for group(s) {', '.join(untuned)} in GENSHOP_ADAPTERS: they get the base model, "
                     "the same images, so no disparity between them")
    return AuditReport(
        kind="generator", created=datetime.now(timezone.utc), model=loaded.model_id,
        catalog=[str(p) for p in config.catalog], catalog_items=len(frame), threshold=config.threshold,
        settings={"briefs": str(config.briefs), "variants": config.variants, "steps": briefs[0].steps,
                  "seed": config.seed, "preset": preset.name, "tuned_groups": tuned},
        groups=audits, disparities=disparities({a.group_id: a.attributes for a in audits}, config.threshold),
        notes=notes)
