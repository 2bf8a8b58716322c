"""Scoring images for customer groups: the function workers call.

Load once per process::

    model, embedder = load_scorer("runs/reward/group/model")
    scores = score_images(model, embedder, images, "women's red ethnic kurta", ["A", "B"])
    scores["A"].rewards        # one reward (a logit) per image
    scores["A"].probabilities  # softmax over these images: P(chosen) if they were shown together

The images are embedded in batches once, the brief once, and every (image, group) pair is
scored in one forward pass. A group the model does not know is scored as the population
(the group-agnostic average taste); its entry says ``fallback=True`` and
``scored_as="population"``, and an ``UnknownGroupWarning`` is issued.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from genshop.embedding import Embedder, EmbeddingConfig, load_embedder
from reward.groups import POPULATION
from reward.model import RewardModel

logger = logging.getLogger(__name__)


class UnknownGroupWarning(UserWarning):
    """A group the reward model was not trained on: scored as the population."""


class GroupScores(BaseModel):
    group_id: str
    scored_as: str
    fallback: bool
    rewards: list[float]
    probabilities: list[float]


def load_scorer(model_dir: str | Path, device: str = "cpu", embedding: EmbeddingConfig | None = None
                ) -> tuple[RewardModel, Embedder]:
    """The reward model and the embedder it was trained with (or ``embedding``, which must match its dimension),
    with the model's LoRA on the image tower when it has one."""
    model = RewardModel.from_pretrained(model_dir, device=device)
    config = embedding or model.config.embedding
    if config is None:
        raise ValueError(f"{model_dir} records no embedder; pass an EmbeddingConfig")
    embedder = load_embedder(config.model_copy(update={"device": device}))
    if model.config.image_lora:
        from reward.clip_lora import load_image_lora

        load_image_lora(embedder, Path(model_dir) / model.config.image_lora)
    return model, embedder


def as_image(image: Image.Image | str | Path) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


@torch.no_grad()
def score_embeddings(model: RewardModel, image_embeddings: np.ndarray, brief_embedding: np.ndarray,
                     group_ids: Sequence[str]) -> dict[str, GroupScores]:
    """Rewards of ``[N, D]`` image embeddings for one brief ``[D]`` and each group (one forward pass)."""
    device = next(model.parameters()).device
    indices, fallbacks = [], []
    for group_id in group_ids:
        index, fallback = model.group_index(group_id)
        indices.append(index)
        fallbacks.append(fallback)
        if fallback:
            message = f"reward model knows no group {group_id!r}: scored as the population"
            logger.warning(message)
            warnings.warn(message, UnknownGroupWarning, stacklevel=3)
    g = len(indices)
    images = torch.as_tensor(image_embeddings, dtype=torch.float32, device=device)[None].expand(g, -1, -1)
    brief = torch.as_tensor(brief_embedding, dtype=torch.float32, device=device).reshape(1, -1).expand(g, -1)
    rewards, _ = model(images, brief, torch.tensor(indices, device=device))
    rewards = rewards.float().cpu()
    probabilities = torch.softmax(rewards, dim=1)
    return {
        group_id: GroupScores(group_id=group_id, scored_as=model.group_ids[index] if index else POPULATION,
                              fallback=fallback, rewards=rewards[i].tolist(), probabilities=probabilities[i].tolist())
        for i, (group_id, index, fallback) in enumerate(zip(group_ids, indices, fallbacks))
    }


def score_images(model: RewardModel, embedder: Embedder, images: Sequence[Image.Image | str | Path],
                 brief_text: str, group_ids: Sequence[str]) -> dict[str, GroupScores]:
    """Per group, the reward of every image for this brief (images as PIL images or file paths)."""
    if not images:
        return {g: GroupScores(group_id=g, scored_as=g, fallback=False, rewards=[], probabilities=[]) for g in group_ids}
    image_embeddings = embedder.embed_images([as_image(image) for image in images])
    brief_embedding = embedder.embed_texts([brief_text])[0]
    return score_embeddings(model, image_embeddings, brief_embedding, list(dict.fromkeys(group_ids)))


@dataclass(frozen=True)
class ImageReward:
    """The reward a tuning run, ``tune eval`` or best-of-N serving ranks images by, whichever kind its folder holds:
    ``score(images, prompt, brief, groups) -> {group: [reward per image]}`` (``brief``: the resolved Brief, or None)."""

    score: Callable[..., dict[str, list[float]]]
    embedder: Embedder  # the CLIP it reads images with (``tune eval`` measures diversity in its space)
    groups: tuple[str, ...] | None  # an attribute reward's groups; None: a CLIP reward model (the population for others)


def load_image_reward(reward_dir: str | Path, enrich_config=None) -> ImageReward:
    """A CLIP reward model folder (``load_scorer``), or an attribute reward (``reward.attribute_reward``: a folder
    with ``attribute_reward.json``) read through the enrich stage of ``enrich_config`` (default: the settings')
    with the reward's reader."""
    from reward.attribute_reward import AttributeReward, image_scorer, is_attribute_reward

    if is_attribute_reward(Path(reward_dir)):
        from genshop.enrichment import enrich_config_from_settings, load_enricher
        from genshop.settings import get_settings

        reward = AttributeReward.from_pretrained(reward_dir)
        config = enrich_config or enrich_config_from_settings(get_settings())
        enricher = load_enricher(config.model_copy(update={"classifier": reward.config.reader}))
        read = image_scorer(reward, enricher)

        def score_attributes(images, prompt, brief, groups):
            fields = {} if brief is None else {"usage": brief.usage, "gender": brief.gender,
                                               "article_type": brief.article_type}
            return read(images, list(groups), **fields)

        return ImageReward(score_attributes, enricher.embedder, tuple(reward.config.groups))
    model, embedder = load_scorer(reward_dir)

    def score_clip(images, prompt, brief, groups):
        return {g: s.rewards for g, s in score_images(model, embedder, images, prompt, groups).items()}

    return ImageReward(score_clip, embedder, None)
