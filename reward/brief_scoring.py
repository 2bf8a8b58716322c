"""Score a stored brief's items for its target groups and store the scores.

The one code path for the ``score`` Celery task and for the in-process worker of
``genshop demo`` / ``submit --local``: read the brief and its items from the store, score
every image for every target group with the reward model, write the scores back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from genshop.embedding import Embedder
from genshop.generation import build_prompt
from genshop.store import NewScore, ScoreRecord, Store
from reward.model import RewardModel
from reward.scoring import load_scorer, score_images


@dataclass(frozen=True)
class BriefScorer:
    model: RewardModel
    embedder: Embedder
    model_id: str  # recorded with every score: folder name and a fingerprint of its files


def reward_model_id(model_dir: str | Path) -> str:
    """The id recorded with every score: the folder's name and a fingerprint of its files."""
    folder = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):  # the CLIP LoRA folder, when there is one, included
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return f"{folder.name}@{digest.hexdigest()[:12]}"


def load_brief_scorer(model_dir: str | Path, device: str = "cpu") -> BriefScorer:
    model, embedder = load_scorer(model_dir, device=device)
    return BriefScorer(model=model, embedder=embedder, model_id=reward_model_id(model_dir))


def score_brief(store: Store, brief_id: str, scorer: BriefScorer) -> list[ScoreRecord]:
    """Score every item of the brief for every target group (none: nothing to do); idempotent."""
    record = store.get_brief(brief_id)
    items = store.list_items(brief_id)
    if record.brief.groups and items:
        scores = score_images(scorer.model, scorer.embedder, [store.images.path(i.image_path) for i in items],
                              build_prompt(record.brief), record.brief.groups)
        store.add_scores([
            NewScore(item_id=item.id, group_id=group_id, reward_model=scorer.model_id, score=group.rewards[k],
                     population_fallback=group.fallback)
            for group_id, group in scores.items() for k, item in enumerate(items)
        ])
    return store.list_scores(brief_id)
