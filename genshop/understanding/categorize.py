"""Categorization and attribute extraction from CLIP image embeddings, zero-shot or top-tuned.

Two classifiers give the same thing: for every output (the three taxonomy levels and each
attribute family) a log-posterior over its labels.

- ``ZeroShotClassifier``: each label's text embedding is the mean over a prompt ensemble
  (re-normalised); logits are ``scale * cos(image, label)`` plus the label's log prior
  from the taxonomy's counts (Bayes' rule on a contrastive model's logits; see
  ``evaluation/clip_eval``). ``scale`` starts as the model's ``logit_scale``.
- ``LinearHeads`` (top-tuning): one linear softmax head per output on frozen image
  embeddings, fitted on a labelled catalog (``fit_linear_heads``).

``understand`` turns those into ``ItemUnderstanding``s: the three levels are combined on
the taxonomy tree (a product of the levels' posteriors over leaves, so master, sub and
article always form a real path), read top-down, each with its marginal probability as
confidence and abstaining below a threshold; attribute families that do not apply to
the predicted master category are skipped; a listing title is assembled from the result.
Confidences are calibrated by one temperature per output (``calibrate``), fitted on
labelled data by minimising log-loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from genshop.understanding.taxonomy import LEVELS, UNKNOWN_VALUES, Taxonomy

HIERARCHY = "hierarchy"  # the temperature of the combined leaf distribution
HEADS_CONFIG = "heads_config.json"
HEADS_WEIGHTS = "heads.safetensors"


class LabelScore(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str | None = Field(description="None when abstained")
    confidence: float
    abstained: bool = False


class ItemUnderstanding(BaseModel):
    master_category: LabelScore
    sub_category: LabelScore
    article_type: LabelScore
    attributes: dict[str, LabelScore] = Field(description="families that apply to the predicted master category")
    title: str


# ---------------------------------------------------------------- pure functions

def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def log_prior(counts: Mapping[str, int], labels: Sequence[str], smoothing: float = 1.0) -> np.ndarray:
    smoothed = np.array([counts.get(label, 0) + smoothing for label in labels], dtype=np.float64)
    return np.log(smoothed / smoothed.sum())


def fit_temperature(log_posterior_at: Callable[[float], np.ndarray], targets: np.ndarray,
                    grid: np.ndarray | None = None) -> float:
    """The temperature T minimising the log-loss of ``log_posterior_at(T)`` (a 1-D search in log space)."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121)) if grid is None else grid
    losses = [-log_posterior_at(t)[np.arange(len(targets)), targets].mean() for t in grid]
    return float(grid[int(np.argmin(losses))])


def leaf_log_posterior(level_log_posteriors: Mapping[str, np.ndarray], taxonomy: Taxonomy,
                       temperature: float = 1.0) -> np.ndarray:
    """``[n, article types]``: the product of the three levels' posteriors along each leaf's path, renormalised."""
    index = {level: {label: i for i, label in enumerate(taxonomy.labels(level))} for level in LEVELS}
    leaves = taxonomy.labels("article_type")
    by_name = {a.name: a for a in taxonomy.article_types}
    master = np.array([index["master_category"][by_name[leaf].master_category] for leaf in leaves])
    sub = np.array([index["sub_category"][by_name[leaf].sub_category] for leaf in leaves])
    combined = (level_log_posteriors["article_type"] + level_log_posteriors["sub_category"][:, sub]
                + level_log_posteriors["master_category"][:, master])
    return log_softmax(combined / temperature)


def listing_title(template: str, fields: Mapping[str, str | None]) -> str:
    """The template filled in; a value already part of another one ("Casual" beside "Casual Shoes") drops out."""
    values = {key: value or "" for key, value in fields.items()}
    for key, value in values.items():
        if value and any(other != key and value.lower() in v.lower().split() + [v.lower()] and value != v
                         for other, v in values.items()):
            values[key] = ""
    return " ".join(template.format_map(_Blank(values)).split())


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


def understand(log_posteriors: Mapping[str, np.ndarray], taxonomy: Taxonomy, abstain_below: float = 0.5,
               hierarchy_temperature: float = 1.0) -> list[ItemUnderstanding]:
    """Per item: the taxonomy path read top-down on the combined leaf posterior, attributes, a title."""
    leaves = taxonomy.labels("article_type")
    by_name = {a.name: a for a in taxonomy.article_types}
    joint = np.exp(leaf_log_posterior(log_posteriors, taxonomy, hierarchy_temperature))
    masters = np.array([by_name[leaf].master_category for leaf in leaves])
    subs = np.array([by_name[leaf].sub_category for leaf in leaves])
    results = []
    for row in joint:
        path: dict[str, LabelScore] = {}
        allowed = np.ones(len(leaves), dtype=bool)
        abstained = False
        for level, parents in (("master_category", masters), ("sub_category", subs), ("article_type", np.array(leaves))):
            candidates = sorted(set(parents[allowed]))
            mass = {label: float(row[allowed & (parents == label)].sum()) for label in candidates}
            best = max(mass, key=mass.get)
            abstained = abstained or mass[best] < abstain_below
            path[level] = LabelScore(label=None if abstained else best, confidence=mass[best], abstained=abstained)
            allowed &= parents == best
        results.append(path)

    items = []
    for i, path in enumerate(results):
        master = path["master_category"].label or str(masters[int(np.argmax(joint[i]))])
        attributes = {}
        for family in taxonomy.attributes:
            if family.name not in log_posteriors or not family.applies(master):
                continue
            probabilities = np.exp(log_posteriors[family.name][i])
            best = int(np.argmax(probabilities))
            confidence = float(probabilities[best])
            low = confidence < abstain_below
            attributes[family.name] = LabelScore(label=None if low else sorted(family.values)[best],
                                                 confidence=confidence, abstained=low)
        fields = {name: score.label for name, score in {**path, **attributes}.items()}
        items.append(ItemUnderstanding(**path, attributes=attributes, title=listing_title(taxonomy.title_template, fields)))
    return items


def output_labels(taxonomy: Taxonomy) -> dict[str, list[str]]:
    """Every output's labels in column order: the three levels, then each attribute family."""
    return {**{level: taxonomy.labels(level) for level in LEVELS},
            **{family.name: sorted(family.values) for family in taxonomy.attributes}}


def label_targets(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Column index of each value, -1 where the value is unknown or not a label."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([-1 if value in UNKNOWN_VALUES else index.get(value, -1) for value in values])


# ---------------------------------------------------------------- the classifiers

class Classifier:
    """What both classifiers share: per-output ``scores``, a ``posterior`` at a temperature, fitted ``temperatures``."""

    temperatures: dict[str, float]

    def scores(self, image_embeddings: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def posterior(self, name: str, scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        raise NotImplementedError

    def log_posteriors(self, image_embeddings: np.ndarray) -> dict[str, np.ndarray]:
        return {name: self.posterior(name, scores, self.temperatures.get(name, 1.0))
                for name, scores in self.scores(image_embeddings).items()}


class ZeroShotClassifier(Classifier):
    """Prompt-ensemble class embeddings per output, scored with a scale and the taxonomy's label prior."""

    kind = "zero-shot"

    def __init__(self, embedder, taxonomy: Taxonomy, temperatures: Mapping[str, float] | None = None):
        self.taxonomy, self.labels = taxonomy, output_labels(taxonomy)
        self.scale = embedder.logit_scale
        self.temperatures = dict(temperatures or {})
        self.class_embeddings, self.log_priors = {}, {}
        for name, labels in self.labels.items():
            templates = taxonomy.templates[name] if name in taxonomy.templates else taxonomy.family(name).templates
            texts = [template.format(label) for label in labels for template in templates]
            means = embedder.embed_texts(texts).reshape(len(labels), len(templates), -1).mean(axis=1)
            self.class_embeddings[name] = means / np.linalg.norm(means, axis=1, keepdims=True)
            counts = taxonomy.counts(name) if name in LEVELS else taxonomy.family(name).values
            self.log_priors[name] = log_prior(counts, labels)

    def scores(self, image_embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Cosine similarity to every label of every output."""
        return {name: image_embeddings @ classes.T for name, classes in self.class_embeddings.items()}

    def posterior(self, name: str, scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """The temperature divides the similarity term only: the prior stays Bayes' prior."""
        return log_softmax(self.scale / temperature * scores + self.log_priors[name])



class LinearHeads(Classifier):
    """Top-tuning: a linear softmax head per output on frozen, unit-length image embeddings."""

    kind = "top-tuned"

    def __init__(self, taxonomy: Taxonomy, weights: Mapping[str, torch.Tensor], biases: Mapping[str, torch.Tensor],
                 temperatures: Mapping[str, float] | None = None):
        self.taxonomy, self.labels = taxonomy, output_labels(taxonomy)
        self.weights, self.biases = dict(weights), dict(biases)
        self.temperatures = dict(temperatures or {})

    def scores(self, image_embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """The heads' logits."""
        features = torch.from_numpy(np.asarray(image_embeddings, dtype=np.float32))
        return {name: (features @ self.weights[name].T + self.biases[name]).double().numpy() for name in self.weights}

    def posterior(self, name: str, scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        return log_softmax(scores / temperature)


    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.weight": w.contiguous() for name, w in self.weights.items()}
        tensors |= {f"{name}.bias": b.contiguous() for name, b in self.biases.items()}
        save_file(tensors, str(folder / HEADS_WEIGHTS))
        config = {"labels": self.labels, "temperatures": self.temperatures}
        (folder / HEADS_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, taxonomy: Taxonomy) -> "LinearHeads":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / HEADS_CONFIG).read_text(encoding="utf-8"))
        if config["labels"] != output_labels(taxonomy):
            raise ValueError(f"{folder}: the heads were fitted on another taxonomy; refit with `genshop understand fit`")
        tensors = load_file(str(folder / HEADS_WEIGHTS))
        names = config["labels"].keys()
        return cls(taxonomy, {n: tensors[f"{n}.weight"] for n in names if f"{n}.weight" in tensors},
                   {n: tensors[f"{n}.bias"] for n in names if f"{n}.bias" in tensors}, config["temperatures"])


def fit_linear_heads(image_embeddings: np.ndarray, labelled: Mapping[str, Sequence[str]], taxonomy: Taxonomy,
                     iterations: int = 200, learning_rate: float = 0.05, weight_decay: float = 1e-4,
                     seed: int = 0) -> LinearHeads:
    """Full-batch softmax regression per output (rows with an unknown label are left out of that output)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.from_numpy(np.asarray(image_embeddings, dtype=np.float32))
    weights, biases = {}, {}
    for name, labels in output_labels(taxonomy).items():
        if name not in labelled:
            continue
        targets = torch.from_numpy(label_targets(labelled[name], labels))
        keep = targets >= 0
        head = torch.nn.Linear(features.shape[1], len(labels))
        torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
        torch.nn.init.zeros_(head.bias)
        optimizer = torch.optim.LBFGS(head.parameters(), lr=learning_rate * 20, max_iter=iterations,
                                      line_search_fn="strong_wolfe")
        x, y = features[keep], targets[keep]

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x), y) + weight_decay * head.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        weights[name], biases[name] = head.weight.detach().clone(), head.bias.detach().clone()
    return LinearHeads(taxonomy, weights, biases)


def calibrate(classifier, image_embeddings: np.ndarray, labelled: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Fit one temperature per output (and for the combined hierarchy) on labelled data; set and return them."""
    scores = classifier.scores(image_embeddings)
    temperatures = {}
    for name, labels in classifier.labels.items():
        if name not in labelled or name not in scores:
            continue
        targets = label_targets(labelled[name], labels)
        keep = targets >= 0
        temperatures[name] = fit_temperature(lambda t: classifier.posterior(name, scores[name][keep], t), targets[keep])
    classifier.temperatures = dict(temperatures)
    if "article_type" in labelled:
        combined = leaf_log_posterior(classifier.log_posteriors(image_embeddings), classifier.taxonomy)
        targets = label_targets(labelled["article_type"], classifier.labels["article_type"])
        keep = targets >= 0
        temperatures[HIERARCHY] = fit_temperature(lambda t: log_softmax(combined[keep] / t), targets[keep])
    classifier.temperatures = temperatures
    return temperatures
