"""Score a stored brief's items for its target groups and store the scores.

The one code path for the ``score`` Celery task and for the in-process worker of
``genshop demo`` / ``submit --local``: read the brief and its items from the store, score
every image for every target group with the reward model, write the scores back. A worker
that gathered several briefs' messages scores them together (``score_briefs``: one CLIP
forward for all their images).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from genshop.embedding import Embedder
from genshop.generation import build_prompt
from genshop.store import NewScore, ScoreRecord, Store
from reward.model import RewardModel
from reward.scoring import as_image, load_scorer, score_embeddings


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
    return score_briefs(store, [brief_id], scorer)[brief_id]


def score_briefs(store: Store, brief_ids: list[str], scorer: BriefScorer) -> dict[str, list[ScoreRecord]]:
    """``score_brief`` for several briefs with one CLIP forward: every image of every brief not yet
    scored by this model is embedded in one batch, every brief's prompt in another, then each
    brief's items are scored for its groups and all the scores are stored in one transaction.
    A brief already scored for all its groups is only read back."""
    brief_ids = list(dict.fromkeys(brief_ids))
    records, items_of = store.get_briefs(brief_ids), store.list_items_of(brief_ids)
    scores_of = store.list_scores_of(brief_ids)
    todo = []  # (brief id, prompt, groups, items)
    for brief_id in brief_ids:
        if brief_id not in records:
            store.get_brief(brief_id)  # raises UnknownBriefError, as one brief alone does
        record, items = records[brief_id], items_of[brief_id]
        if not record.brief.groups or not items:
            continue
        scored = {(s.item_id, s.group_id) for s in scores_of[brief_id] if s.reward_model == scorer.model_id}
        if all((item.id, group) in scored for item in items for group in record.brief.groups):
            continue
        todo.append((brief_id, build_prompt(record.brief), record.brief.groups, items))
    if todo:
        images = [as_image(store.images.path(item.image_path)) for *_, items in todo for item in items]
        image_embeddings = scorer.embedder.embed_images(images)
        prompts = list(dict.fromkeys(prompt for _, prompt, _, _ in todo))
        text_embeddings = dict(zip(prompts, scorer.embedder.embed_texts(prompts)))
        new_scores, start = [], 0
        for _, prompt, groups, items in todo:
            scores = score_embeddings(scorer.model, image_embeddings[start:start + len(items)], text_embeddings[prompt],
                                      list(dict.fromkeys(groups)))
            start += len(items)
            new_scores += [NewScore(item_id=item.id, group_id=group_id, reward_model=scorer.model_id,
                                    score=group.rewards[k], population_fallback=group.fallback)
                           for group_id, group in scores.items() for k, item in enumerate(items)]
        store.add_scores(new_scores)
        scores_of = store.list_scores_of(brief_ids)
    return scores_of
