"""A group reward over item attributes, learned from clicks, read off images by the product's classifier.

The CLIP reward (``reward.model``) maps pixels to a group's taste in one step. This one splits
the step in two, each learned where it can be learned well:

1. **Taste from clicks**, per group: a multinomial logit with a no-choice option over the
   catalog attributes of the K items each impression showed (one-hot ``attribute=value``
   features and their crosses with the colour, where the groups disagree most), fitted by
   maximum likelihood with a little L2, beside one weight shared by all groups for an item in
   the colour the brief names. The catalog knows its items' attributes, so no image is read here.
2. **Attributes from pixels**: a generated image's utility is the fitted utility in
   expectation over what the enrich stage's classifier reads in it, article type (the
   taxonomy's leaf posterior, which fixes sub and master category) x colour, with the brief's
   usage and gender. Where the brief names its article type, that type is taken as given
   (``brief_article_type: fixed``, the default): the reward then weighs only what the brief
   leaves free, and never pays for drifting to a type the group likes better; ``on_brief_weight``
   adds that weight times the log-probability the reader gives the brief's type.

Saved as ``attribute_reward.json`` (groups, features, reader) and ``attribute_reward.safetensors``
(``weights [groups, features]``, ``no_choice [groups]``, ``brief_colour []``); ``genshop tune --reward DIR`` takes
such a folder in place of a CLIP reward model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

CONFIG_NAME = "attribute_reward.json"
WEIGHTS_NAME = "attribute_reward.safetensors"
ATTRIBUTES = ("colour", "article_type", "sub_category", "master_category", "usage", "gender")
CROSSED_WITH_COLOUR = ("article_type", "sub_category", "master_category", "usage", "gender")
ProgressCallback = Callable[[int, int], None]  # (done, total)


class AttributeRewardConfig(BaseModel):
    groups: list[str] = Field(min_length=1)
    features: list[str] = Field(description="``attribute=value`` and ``colour=c&attribute=value``, in weight order")
    reader: Literal["zero-shot", "top-tuned"] = Field(
        default="top-tuned", description="the enrich stage's classifier that reads a generated image's attributes")
    brief_article_type: Literal["fixed", "read"] = Field(
        default="fixed", description="a brief that names its article type: score every image as that type, so the "
        "reward weighs only what the brief leaves free (the colour), or read the type from the image as well")
    on_brief_weight: float = Field(default=0.0, ge=0, description="plus this times the log-probability the reader "
                                   "gives the brief's article type: the more surely on brief, the better")
    impressions: int = Field(default=0, description="impressions fitted on")


def item_features(items: pd.DataFrame) -> list[list[str]]:
    """Each item's features: ``attribute=value`` for every attribute, and each crossed with its colour."""
    columns = [items[a].fillna("").astype(str).to_numpy() for a in ATTRIBUTES]
    features = []
    for values in zip(*columns):
        row = dict(zip(ATTRIBUTES, values))
        features.append([f"{a}={row[a]}" for a in ATTRIBUTES]
                        + [f"colour={row['colour']}&{a}={row[a]}" for a in CROSSED_WITH_COLOUR])
    return features


class AttributeReward:
    def __init__(self, config: AttributeRewardConfig, weights: np.ndarray, no_choice: np.ndarray,
                 brief_colour: float = 0.0):
        self.config, self.weights, self.no_choice, self.brief_colour = config, weights, no_choice, brief_colour
        self.index = {name: i for i, name in enumerate(config.features)}

    def utilities(self, items: pd.DataFrame) -> np.ndarray:
        """``[groups, items]``: the fitted utility of each item (a feature never seen in training adds 0)."""
        utilities = np.zeros((len(self.config.groups), len(items)))
        for i, names in enumerate(item_features(items)):
            columns = [self.index[n] for n in names if n in self.index]
            utilities[:, i] = self.weights[:, columns].sum(axis=1)
        return utilities

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weights": torch.from_numpy(self.weights).float().contiguous(),
                   "no_choice": torch.from_numpy(self.no_choice).float().contiguous(),
                   "brief_colour": torch.tensor(float(self.brief_colour))}, str(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(self.config.model_dump_json(indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> AttributeReward:
        path = Path(path)
        config = AttributeRewardConfig.model_validate_json((path / CONFIG_NAME).read_text())
        tensors = load_file(str(path / WEIGHTS_NAME))
        return cls(config, tensors["weights"].double().numpy(), tensors["no_choice"].double().numpy(),
                   float(tensors["brief_colour"]))


def is_attribute_reward(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def fit_attribute_reward(impressions: pd.DataFrame, items: pd.DataFrame, steps: int = 300, lr: float = 0.05,
                         l2: float = 1e-5, reader: str = "top-tuned", brief_article_type: str = "fixed",
                         progress: ProgressCallback | None = None) -> AttributeReward:
    """Maximum likelihood on ``impressions`` (``group_id``, ``brief``, ``items``: product ids shown, ``chosen``: one
    of them or empty) of the catalog rows ``items`` (``product_id`` and the attributes); full-batch Adam."""
    names = item_features(items)
    features = sorted({n for row in names for n in row})
    vocabulary = {n: i for i, n in enumerate(features)}
    item_index = {pid: i for i, pid in enumerate(items["product_id"].astype(str))}
    unknown = sorted({p for row in impressions["items"] for p in row if str(p) not in item_index})
    if unknown:
        raise ValueError(f"items: {len(unknown)} product id(s) the catalog lacks, e.g. {unknown[:3]}; nothing fitted")
    item_features_index = torch.tensor([[vocabulary[n] for n in row] for row in names])  # [items, F per item]
    shown = torch.tensor([[item_index[str(p)] for p in row] for row in impressions["items"]])  # [n, k]
    chosen = torch.tensor([len(row) if pd.isna(c) else [str(p) for p in row].index(str(c))
                           for row, c in zip(impressions["items"], impressions["chosen"])])
    colour = items["colour"].fillna("").astype(str).str.lower().to_numpy()
    brief_colour = torch.tensor([[bool(colour[i]) and f" {colour[i]} " in f" {brief.lower()} " for i in row]
                                 for row, brief in zip(shown.tolist(), impressions["brief"].astype(str))],
                                dtype=torch.float64)  # [n, k]: the item has the colour the brief names
    groups = sorted(impressions["group_id"].astype(str).unique())
    group = torch.tensor([groups.index(g) for g in impressions["group_id"].astype(str)])

    weights = torch.zeros(len(groups), len(features), dtype=torch.float64, requires_grad=True)
    no_choice = torch.zeros(len(groups), dtype=torch.float64, requires_grad=True)
    colour_weight = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weights, no_choice, colour_weight], lr=lr)
    shown_features = item_features_index[shown]  # [n, k, F per item]
    for step in range(steps):
        utilities = weights[group[:, None, None], shown_features].sum(-1) + colour_weight * brief_colour  # [n, k]
        logits = torch.cat([utilities, no_choice[group][:, None]], dim=1)
        loss = torch.nn.functional.cross_entropy(logits, chosen) + l2 * weights.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, steps)
    config = AttributeRewardConfig(groups=groups, features=features, reader=reader,
                                   brief_article_type=brief_article_type, impressions=len(impressions))
    return AttributeReward(config, weights.detach().numpy(), no_choice.detach().numpy(), float(colour_weight.detach()))


def expected_utilities(utilities: Callable[[pd.DataFrame], np.ndarray], leaf_posterior: np.ndarray,
                       colour_posterior: np.ndarray, leaves: list[str], parents: dict[str, tuple[str, str]],
                       colours: list[str], usage: str = "", gender: str = "") -> np.ndarray:
    """``[groups, n]``: each group's ``utilities`` (items frame -> ``[groups, items]``) in expectation over
    ``[n, leaves]`` article-type and ``[n, colours]`` colour posteriors (read independently), with the brief's
    usage and gender."""
    grid = pd.DataFrame([{"article_type": leaf, "sub_category": parents[leaf][1], "master_category": parents[leaf][0],
                          "colour": colour, "usage": usage, "gender": gender} for leaf in leaves for colour in colours])
    table = utilities(grid)
    table = table.reshape(len(table), len(leaves), len(colours))
    return np.einsum("nl,glc,nc->gn", leaf_posterior, table, colour_posterior)


def image_scorer(reward: AttributeReward, enricher) -> Callable[..., dict[str, list[float]]]:
    """``score(images, groups, usage, gender, article_type) -> {group: [utility per image]}`` through
    ``enricher``'s classifier (the brief's fields; ``article_type`` is used as the config's ``brief_article_type`` says)."""
    from genshop.understanding.categorize import HIERARCHY, leaf_log_posterior

    taxonomy, classifier = enricher.taxonomy, enricher.classifier
    leaves = taxonomy.labels("article_type")
    parents = {a.name: (a.master_category, a.sub_category) for a in taxonomy.article_types}
    colours = classifier.labels["colour"]

    def score(images, groups: list[str], usage: str | None = None, gender: str | None = None,
              article_type: str | None = None) -> dict[str, list[float]]:
        missing = [g for g in groups if g not in reward.config.groups]
        if missing:
            raise ValueError(f"the attribute reward knows no group(s) {missing}; it has {reward.config.groups}")
        log_posteriors = classifier.log_posteriors(enricher.embedder.embed_images(list(images)))
        log_leaf = leaf_log_posterior(log_posteriors, taxonomy, classifier.temperatures.get(HIERARCHY, 1.0))
        leaf = np.exp(log_leaf)
        on_brief = np.zeros(len(leaf))
        if article_type in leaves:
            on_brief = reward.config.on_brief_weight * log_leaf[:, leaves.index(article_type)]
            if reward.config.brief_article_type == "fixed":
                leaf = np.zeros_like(leaf)
                leaf[:, leaves.index(article_type)] = 1.0
        values = expected_utilities(reward.utilities, leaf, np.exp(log_posteriors["colour"]), leaves, parents,
                                    colours, usage or "", gender or "") + on_brief
        return {g: values[reward.config.groups.index(g)].tolist() for g in groups}

    return score
