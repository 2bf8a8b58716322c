"""Evaluating reward models on impressions, against the Bayes-optimal ceiling and two baselines.

Models compared on the same impressions (every item should be held out from training):

- ``group``: the group reward model under test (through its own LoRA on the CLIP's image
  tower when it has one; every other row reads the frozen CLIP);
- ``group_agnostic``: a model of the same size trained without groups (PickScore-like);
- ``clip``: the plain CLIP image–brief score, ``logit_scale * cosine(image, brief)``;
- ``bayes``: the simulator's true probabilities (when the file has ``sim_probabilities``);
- ``attribute_reader``: the simulator's exact utilities applied to the attributes that the
  understanding heads read from the same image features (``reward.ceiling``), when both the
  understanding folder and the simulator spec are given: what these features allow. With
  the catalog's labels, ``measured`` adds ``reader_bayes_fraction_only_<attribute>_read``:
  the same reader with that one attribute read from the features and the rest from the labels.

Metrics (see ``reward.metrics``): accuracy (ties count half), accuracy per group, log-loss
of the chosen item among those shown (and with "none" for models that predict it), expected
calibration error, accuracy as a fraction of the Bayes-optimal accuracy on the same
impressions, and accuracy on impressions where groups disagree: ``disagree_any`` (the
groups' most likely picks among the shown items are not all the same) and
``disagree_population`` (the impression's group's most likely pick is not the population's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from genshop.embedding import EmbeddingConfig
from genshop.understanding.fitting import DEFAULT_TAXONOMY
from reward.data import ImpressionTensors, impression_tensors, predict
from reward.features import EmbedderFeatures, FeatureSource
from reward.impressions import read_impression_files
from reward.metrics import accuracy, expected_calibration_error, log_loss, top_choice_credit
from reward.model import RewardModel
from reward.training import TRAINING_ITEMS

TARGET_BAYES_FRACTION = 0.95
TARGET_DISAGREEMENT_GAP = 0.15

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


class RewardEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="the group reward model folder")
    baseline: Path | None = Field(default=None, description="a group-agnostic reward model folder")
    impressions: list[Path] = Field(min_length=1)
    catalog: list[Path] = Field(default_factory=list)
    embedding: EmbeddingConfig | None = Field(default=None, description="default: the one recorded in the model")
    cache_dir: Path | None = None
    clip_baseline: bool = True
    understanding: Path | None = Field(default=None, description="`genshop understand fit` folder, for the "
                                                                 "attribute_reader ceiling (with simulator)")
    simulator: Path | None = Field(default=None, description="the groups YAML whose hidden utilities made the impressions")
    taxonomy: Path = Field(default=DEFAULT_TAXONOMY, description="the taxonomy the understanding heads were fitted on")


class ModelMetrics(BaseModel):
    accuracy: float
    accuracy_by_group: dict[str, float]
    log_loss: float = Field(description="-log P(chosen) among the items shown, impressions with a choice")
    log_loss_with_none: float | None = Field(default=None, description="over all impressions, 'none' included")
    calibration_error: float
    bayes_fraction: float | None = None
    accuracy_disagree_any: float | None = None
    accuracy_disagree_population: float | None = None


class RewardEvalReport(BaseModel):
    impressions: int
    impressions_with_choice: int
    items: int
    items_seen_in_training: int | None = None
    groups: dict[str, int]
    disagree_any: int | None = None
    disagree_population: int | None = None
    models: dict[str, ModelMetrics]
    targets: dict[str, float] = Field(default_factory=dict)
    measured: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list, description="why a column is blank, which groups were scored as "
                                                               "the population: printed with the table")

    def passed(self) -> dict[str, bool]:
        return {name: self.measured.get(name, float("nan")) >= target for name, target in self.targets.items()}


def model_metrics(scores: np.ndarray, mask: np.ndarray, chosen: np.ndarray, groups: np.ndarray, frame: pd.DataFrame,
                  no_choice: np.ndarray | None = None, bayes_accuracy: float | None = None) -> ModelMetrics:
    by_group = {g: accuracy(scores[groups == g], mask[groups == g], chosen[groups == g]) for g in sorted(set(groups))}
    metrics = ModelMetrics(
        accuracy=accuracy(scores, mask, chosen), accuracy_by_group=by_group,
        log_loss=log_loss(scores, mask, chosen),
        log_loss_with_none=None if no_choice is None else log_loss(scores, mask, chosen, no_choice),
        calibration_error=expected_calibration_error(scores, mask, chosen))
    if bayes_accuracy:
        metrics.bayes_fraction = metrics.accuracy / bayes_accuracy
    for name in ("disagree_any", "disagree_population"):
        column = f"sim_{name}"
        if column in frame and frame[column].notna().all():
            rows = frame[column].to_numpy(dtype=bool)
            setattr(metrics, f"accuracy_{name}", accuracy(scores[rows], mask[rows], chosen[rows]))
    return metrics


def attribute_readers(config: RewardEvalConfig, data: ImpressionTensors, frame: pd.DataFrame
                      ) -> dict[str, np.ndarray]:
    """``reward.ceiling.reader_scores`` of the impressions, reading the items' embeddings with the heads
    (``attribute_reader``); and, when the catalog labels every item, with one attribute read and the
    others taken from the labels (``only_<attribute>_read``)."""
    from genshop.catalog_data import read_catalog
    from genshop.understanding.categorize import LinearHeads
    from genshop.understanding.taxonomy import load_taxonomy
    from reward.ceiling import label_posteriors, reader_scores
    from reward.simulator import load_simulator_spec

    heads = LinearHeads.from_pretrained(config.understanding, load_taxonomy(config.taxonomy))
    read = {name: np.exp(log_p) for name, log_p in heads.log_posteriors(data.item_embeddings.numpy()).items()}
    spec = load_simulator_spec(config.simulator)

    def scores(posteriors: dict[str, np.ndarray]) -> np.ndarray:
        return reader_scores(spec, frame["group_id"].tolist(), frame["brief"].tolist(), data.item_rows.numpy(),
                             posteriors, heads.labels)

    readers = {"attribute_reader": scores(read)}
    catalog = read_catalog(config.catalog, with_images=False).set_index("product_id") if config.catalog else None
    if catalog is not None and set(data.item_ids) <= set(catalog.index):
        labelled = catalog.loc[data.item_ids]
        truth = {name: label_posteriors(labelled[name].tolist(), heads.labels[name]) for name in read}
        for name in read:
            readers[f"only_{name}_read"] = scores({**truth, name: read[name]})
    return readers


def eval_notes(model: RewardModel, frame: pd.DataFrame) -> list[str]:
    """What the reader of the table must know: groups the model does not know, and why columns are blank."""
    notes = []
    counts = frame["group_id"].value_counts()
    unknown = sorted(g for g in counts.index if model.group_index(g)[1])
    if unknown:
        notes.append(f"the model does not know group(s) {', '.join(unknown)}: their "
                     f"{int(counts[unknown].sum())} impressions are scored as the population")
    if not ("sim_probabilities" in frame and frame["sim_probabilities"].notna().all()):
        notes.append("'× Bayes' is blank: no simulator probabilities in these impressions (not simulated)")
    if not ("sim_disagree_any" in frame and frame["sim_disagree_any"].notna().all()):
        notes.append("'disagree' columns are blank: no simulator disagreement flags in these impressions (not simulated)")
    return notes


def evaluate_reward(config: RewardEvalConfig, progress: ProgressCallback | None = None,
                    features: FeatureSource | None = None) -> RewardEvalReport:
    report = progress or (lambda stage, done, total: None)
    frame = read_impression_files(config.impressions)
    model = RewardModel.from_pretrained(config.model)
    baseline = RewardModel.from_pretrained(config.baseline) if config.baseline else None
    if features is None:
        embedding = config.embedding or model.config.embedding
        if embedding is None:
            raise ValueError(f"{config.model} records no embedder; pass an embedding config")
        features = EmbedderFeatures(embedding, config.catalog, config.cache_dir)
        for candidate in (model, baseline):
            recorded = candidate.config.embedder_fingerprint if candidate and not candidate.config.image_lora else None
            if recorded and recorded != features.fingerprint:
                raise ValueError(f"a model was trained on embedder {recorded}, evaluated with {features.fingerprint}")

    data = impression_tensors(frame, features, lambda g: model.group_index(g)[0],
                              lambda done, total: report("embedding items", done, total))
    model_data = data  # the group model's image embeddings: through its own image-tower LoRA, if it has one
    if model.config.image_lora:
        tuned = EmbedderFeatures(config.embedding or model.config.embedding, config.catalog, config.cache_dir,
                                 image_lora=Path(config.model) / model.config.image_lora)
        if model.config.embedder_fingerprint != tuned.fingerprint:
            raise ValueError(f"{config.model} was trained with embedder {model.config.embedder_fingerprint}, "
                             f"its CLIP with its LoRA is {tuned.fingerprint}")
        model_data = dataclasses.replace(data, item_embeddings=torch.from_numpy(
            tuned.item_embeddings(data.item_ids, lambda done, total: report("embedding items (LoRA)", done, total))))
    mask, chosen = data.mask.numpy(), data.chosen.numpy()
    groups = frame["group_id"].to_numpy()

    bayes_accuracy = None
    models: dict[str, ModelMetrics] = {}
    if "sim_probabilities" in frame and frame["sim_probabilities"].notna().all():
        k = mask.shape[1]
        truth = np.zeros((len(frame), k + 1))
        for i, probabilities in enumerate(frame["sim_probabilities"]):
            truth[i, :len(probabilities) - 1] = probabilities[:-1]
            truth[i, -1] = probabilities[-1]
        bayes_scores = np.where(mask, truth[:, :k], -np.inf)
        bayes_accuracy = float(top_choice_credit(bayes_scores, mask, chosen).mean())
        models["bayes"] = model_metrics(np.log(np.clip(truth[:, :k], 1e-12, None)), mask, chosen, groups, frame,
                                        np.log(np.clip(truth[:, k], 1e-12, None)), bayes_accuracy)

    report("scoring", 0, 3)
    rewards, no_choice = predict(model, model_data)
    models["group"] = model_metrics(rewards, mask, chosen, groups, frame, no_choice, bayes_accuracy)
    if baseline is not None:
        rewards, no_choice = predict(baseline, data)  # it reads every group as the population
        models["group_agnostic"] = model_metrics(rewards, mask, chosen, groups, frame, no_choice, bayes_accuracy)
    report("scoring", 2, 3)
    if config.clip_baseline:
        images = data.item_embeddings[data.item_rows].numpy()  # [N, K, D]
        briefs = data.brief_embeddings[data.brief_rows].numpy()  # [N, D]
        clip_scores = features.logit_scale * np.einsum("nkd,nd->nk", images, briefs)
        models["clip"] = model_metrics(clip_scores, mask, chosen, groups, frame, None, bayes_accuracy)
    reader_fractions = {}
    if config.understanding is not None and config.simulator is not None:
        for name, scores in attribute_readers(config, data, frame).items():
            if name == "attribute_reader":
                models[name] = model_metrics(scores, mask, chosen, groups, frame, None, bayes_accuracy)
            elif bayes_accuracy:
                reader_fractions[f"reader_bayes_fraction_{name}"] = accuracy(scores, mask, chosen) / bayes_accuracy
    report("scoring", 3, 3)

    seen = None
    training_items = Path(config.model).parent / TRAINING_ITEMS
    if training_items.is_file():
        trained_on = set(training_items.read_text(encoding="utf-8").split())
        seen = sum(item in trained_on for item in data.item_ids)

    result = RewardEvalReport(
        impressions=len(frame), impressions_with_choice=int((chosen >= 0).sum()), items=len(data.item_ids),
        items_seen_in_training=seen, groups=frame["group_id"].value_counts().sort_index().to_dict(), models=models)
    if "sim_disagree_any" in frame:
        result.disagree_any = int(frame["sim_disagree_any"].fillna(False).sum())
        result.disagree_population = int(frame["sim_disagree_population"].fillna(False).sum())
    result.measured.update(reader_fractions)
    result.notes = eval_notes(model, frame)
    group = models["group"]
    if group.bayes_fraction is not None:
        result.targets["group_bayes_fraction"] = TARGET_BAYES_FRACTION
        result.measured["group_bayes_fraction"] = group.bayes_fraction
    if "group_agnostic" in models and group.accuracy_disagree_any is not None:
        agnostic = models["group_agnostic"]
        result.targets["gap_disagree_any"] = TARGET_DISAGREEMENT_GAP
        result.measured["gap_disagree_any"] = group.accuracy_disagree_any - agnostic.accuracy_disagree_any
        result.measured["gap_disagree_population"] = (group.accuracy_disagree_population
                                                       - agnostic.accuracy_disagree_population)
        result.measured["gap_all"] = group.accuracy - agnostic.accuracy
    return result
