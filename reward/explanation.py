"""Explanations: which attributes one image's reward rests on, for one brief and group, as
counterfactual differences.

For each attribute the understanding reads from the image (colour, usage, gender, article
type), the image's embedding is swapped to each of the catalog's typical alternatives and
scored again with the same brief and group; the attribute's effect is the image's reward
minus the alternatives' mean reward (weighted by how common each alternative is in the
catalog). "for group B: colour Red +0.80, usage Ethnic +0.30" says that, for group B, this
image would score 0.80 lower in the catalog's usual other colours and 0.30 lower in its
usual other usages. A reward is a logit, so an effect is a log-odds.

The swap goes through the text embeddings and the understanding heads. The direction is the
difference of the two values' text embeddings (each value's prompt-ensemble mean, as the
zero-shot classifier builds them): ``v(λ) = normalize(v + λ (t_b - t_a))``. The step is the
smallest ``λ`` on a grid at which the understanding reads the swapped embedding as the
alternative ``b`` at least as confidently as it read the image as ``a``, a mirror of the
reading; where no step on the grid gets there, the step that reads ``b`` most confidently is
used and the alternative says how confident (``read_confidence``) and that it fell short
(``reached=False``).

Typical alternatives come from the taxonomy's label counts (the train catalog): a family's
``k`` most common other values; for an article type, the most common other types of its sub
category (of its master category when it is alone there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from genshop.understanding.categorize import Classifier, LinearHeads, ZeroShotClassifier, output_labels
from genshop.understanding.taxonomy import Taxonomy
from reward.model import RewardModel
from reward.scoring import score_embeddings

EXPLAINED = ("colour", "usage", "gender", "article_type")
STEPS = np.linspace(0.0, 1.5, 61)  # the λ grid of the swap


class Alternative(BaseModel):
    value: str
    weight: float = Field(description="its share among the alternatives (catalog counts)")
    reward: float = Field(description="the reward with the attribute swapped to this value")
    step: float = Field(description="λ of the swap")
    read_confidence: float = Field(description="the understanding's confidence in this value after the swap")
    reached: bool = Field(description="the swap reads as this value as confidently as the image read as its own")


class AttributeEffect(BaseModel):
    attribute: str
    value: str = Field(description="what the understanding reads in the image")
    confidence: float
    effect: float = Field(description="reward minus the alternatives' weighted mean reward (log-odds)")
    alternatives: list[Alternative]


class Explanation(BaseModel):
    group_id: str
    scored_as: str = Field(description="the group, or 'population' for a group the model does not know")
    brief: str
    reward: float
    effects: list[AttributeEffect] = Field(description="largest |effect| first")
    summary: str = Field(description='"for group B: colour Red +0.80, usage Ethnic +0.30"')


def typical_alternatives(taxonomy: Taxonomy, attribute: str, value: str, k: int = 3) -> list[tuple[str, float]]:
    """The catalog's ``k`` most common values of the attribute other than ``value``, with weights summing to 1."""
    if attribute == "article_type":
        by_name = {a.name: a for a in taxonomy.article_types}
        own = by_name.get(value)
        siblings = [a for a in taxonomy.article_types if own and a.sub_category == own.sub_category and a.name != value]
        if not siblings:
            siblings = [a for a in taxonomy.article_types
                        if a.name != value and (own is None or a.master_category == own.master_category)]
        counts = {a.name: a.count for a in siblings}
    else:
        counts = {v: c for v, c in taxonomy.family(attribute).values.items() if v != value}
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    total = sum(max(c, 1) for _, c in top)
    return [(v, max(c, 1) / total) for v, c in top]


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def swap_step(margins: np.ndarray) -> tuple[int, bool]:
    """The first step whose reading of ``b`` over ``a`` (log-odds ``margins`` along the grid, step 0 the image)
    mirrors the image's of ``a`` over ``b``; without one, the step that reads ``b`` best. (index, reached)"""
    reached = np.flatnonzero(margins >= -margins[0])
    return (int(reached[0]), True) if len(reached) else (int(np.argmax(margins)), False)


def summary_line(group_id: str, effects: Sequence[AttributeEffect], top: int = 3) -> str:
    attribute_name = {"article_type": "article type"}
    parts = [f"{attribute_name.get(e.attribute, e.attribute)} {e.value} {e.effect:+.2f}" for e in effects[:top]]
    return f"for group {group_id}: " + (", ".join(parts) if parts else "no attribute read")


def explain_embeddings(model: RewardModel, classifier: Classifier, directions: Mapping[str, np.ndarray],
                       taxonomy: Taxonomy, image_embeddings: np.ndarray, brief: str, brief_embedding: np.ndarray,
                       group_ids: Sequence[str], k: int = 3, attributes: Sequence[str] = EXPLAINED
                       ) -> list[dict[str, Explanation]]:
    """Per image, per group: the counterfactual effect of each attribute the understanding reads."""
    labels = output_labels(taxonomy)
    images = np.asarray(image_embeddings, dtype=np.float32)
    posteriors = {name: np.exp(p) for name, p in classifier.log_posteriors(images).items()}
    results = []
    for i, v in enumerate(images):
        master = labels["master_category"][int(np.argmax(posteriors["master_category"][i]))]
        plans = []  # (attribute, value, confidence, [(alternative, its column, weight, its rows in the grid)])
        candidates = [v[None]]
        rows = 1
        for attribute in attributes:
            if attribute not in posteriors or attribute not in directions:
                continue
            if attribute != "article_type" and not taxonomy.family(attribute).applies(master):
                continue
            a = int(np.argmax(posteriors[attribute][i]))
            value, confidence = labels[attribute][a], float(posteriors[attribute][i, a])
            swaps = []
            for alternative, weight in typical_alternatives(taxonomy, attribute, value, k):
                b = labels[attribute].index(alternative)
                grid = _normalized(v[None] + STEPS[:, None] * (directions[attribute][b] - directions[attribute][a])[None])
                candidates.append(grid.astype(np.float32))
                swaps.append((alternative, b, weight, slice(rows, rows + len(STEPS))))
                rows += len(STEPS)
            plans.append((attribute, value, confidence, swaps))
        stacked = np.concatenate(candidates)
        log_read = classifier.log_posteriors(stacked)
        chosen = [0]  # row 0: the image itself
        steps = []  # per swap: (step index, read confidence, reached)
        for attribute, value, _confidence, swaps in plans:
            a = labels[attribute].index(value)
            for _alternative, b, _weight, span in swaps:
                j, reached = swap_step(log_read[attribute][span, b] - log_read[attribute][span, a])
                chosen.append(span.start + j)
                steps.append((j, float(np.exp(log_read[attribute][span.start + j, b])), reached))
        scores = score_embeddings(model, stacked[chosen], brief_embedding, list(group_ids))
        per_group = {}
        for group_id, group in scores.items():
            rewards = group.rewards
            effects, position = [], 1
            for attribute, value, confidence, swaps in plans:
                alternatives = []
                for alternative, _b, weight, _span in swaps:
                    j, read_confidence, reached = steps[position - 1]
                    alternatives.append(Alternative(value=alternative, weight=weight, reward=rewards[position],
                                                    step=float(STEPS[j]), read_confidence=read_confidence,
                                                    reached=reached))
                    position += 1
                mean = sum(alt.weight * alt.reward for alt in alternatives)
                effects.append(AttributeEffect(attribute=attribute, value=value, confidence=confidence,
                                               effect=rewards[0] - mean, alternatives=alternatives))
            effects.sort(key=lambda e: -abs(e.effect))
            per_group[group_id] = Explanation(group_id=group_id, scored_as=group.scored_as, brief=brief,
                                              reward=rewards[0], effects=effects,
                                              summary=summary_line(group_id, effects))
        results.append(per_group)
    return results


# ---------------------------------------------------------------- loading, for the faces

@dataclass(frozen=True)
class Explainer:
    model: RewardModel
    embedder: object
    classifier: Classifier
    taxonomy: Taxonomy
    directions: dict[str, np.ndarray]

    def explain_images(self, images, brief: str, group_ids: Sequence[str], k: int = 3) -> list[dict[str, Explanation]]:
        """Images as PIL images or file paths."""
        from PIL import Image

        opened = [image if isinstance(image, Image.Image) else Image.open(image).convert("RGB") for image in images]
        embeddings = self.embedder.embed_images(opened)
        brief_embedding = self.embedder.embed_texts([brief])[0]
        return explain_embeddings(self.model, self.classifier, self.directions, self.taxonomy, embeddings, brief,
                                  brief_embedding, group_ids, k)


def load_explainer(reward_dir: str | Path, taxonomy: Taxonomy, understanding: str | Path | None = None,
                   device: str = "cpu") -> Explainer:
    """The reward model with its CLIP, and the understanding of the same CLIP: the top-tuned heads of
    ``understanding`` when it has them, else the zero-shot classifier (calibrated by it, if given)."""
    from genshop.understanding.categorize import HEADS_CONFIG
    from genshop.understanding.fitting import load_zero_shot_temperatures
    from reward.scoring import load_scorer

    model, embedder = load_scorer(reward_dir, device=device)
    zero_shot = ZeroShotClassifier(embedder, taxonomy, load_zero_shot_temperatures(understanding))
    classifier: Classifier = zero_shot
    if understanding is not None and (Path(understanding) / HEADS_CONFIG).is_file():
        classifier = LinearHeads.from_pretrained(understanding, taxonomy)
        dim = next(iter(classifier.weights.values())).shape[1]
        if dim != model.config.embed_dim:
            raise ValueError(f"the understanding heads in {understanding} read {dim}-dimensional embeddings, the "
                             f"reward model's CLIP makes {model.config.embed_dim}: they need the same CLIP")
    return Explainer(model, embedder, classifier, taxonomy, zero_shot.class_embeddings)
