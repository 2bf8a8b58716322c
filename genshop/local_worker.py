"""The in-process worker of ``genshop demo`` and ``genshop submit --local``.

It runs the steps the Celery tasks run, in the same order and with the same functions:
generate (``genshop.service.run_brief``), then, when an embedding model is configured,
enrich (``genshop.enrichment.enrich_brief``), and when the brief has target groups and a
reward model is configured, score (``reward.brief_scoring.score_brief``). A face, like
``workers/``: it may import ``reward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genshop.enrichment import Enricher, enrich_brief, enrich_config_from_settings, load_enricher
from genshop.pipelines import LoadedPipeline, load_pipeline
from genshop.service import ProgressCallback, run_brief
from genshop.settings import get_settings
from genshop.store import BriefRecord, Store


@dataclass(frozen=True)
class LocalModels:
    pipeline: LoadedPipeline
    scorer: object | None  # reward.brief_scoring.BriefScorer when a reward model is configured
    enricher: Enricher | None  # when an embedding model is configured


def load_local_models(preset: str, index_dir: Path | None = None) -> LocalModels:
    """The models the settings configure; ``index_dir`` replaces the settings' index folder
    (``genshop demo`` indexes into its own folder, never the user's)."""
    settings = get_settings()
    scorer = None
    if settings.reward_model:
        from reward.brief_scoring import load_brief_scorer

        scorer = load_brief_scorer(settings.reward_model)
    enricher = None
    if settings.embedding_model:
        config = enrich_config_from_settings(settings)
        enricher = load_enricher(config.model_copy(update={"index_dir": index_dir}) if index_dir else config)
    return LocalModels(pipeline=load_pipeline(preset), scorer=scorer, enricher=enricher)


def run_locally(store: Store, brief_id: str, models: LocalModels, on_progress: ProgressCallback | None = None) -> BriefRecord:
    record = run_brief(store, brief_id, models.pipeline, get_settings().max_attempts, on_progress)
    if record.status == "succeeded" and models.enricher is not None:
        enrich_brief(store, brief_id, models.enricher)
    if record.status == "succeeded" and record.brief.groups and models.scorer is not None:
        from reward.brief_scoring import score_brief

        score_brief(store, brief_id, models.scorer)
    return record
