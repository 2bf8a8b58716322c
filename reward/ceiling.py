"""The attribute-reader ceiling: how well a reward on these image features could do if it knew
the simulator's hidden utilities exactly.

Each shown item's attributes are read from its (frozen) CLIP embedding by the understanding
heads of ``genshop understand fit`` (calibrated linear heads per taxonomy output), and the item
is scored with its group's true utility in expectation over those readings: a sum over each
attribute's values of P(value) × weight, interactions as products of their conditions'
probabilities, and the brief-colour bonus × P(the item has the colour the brief names). The
simulator scores the catalog's true labels the same way, so a reader that saw the labels
perfectly would score exactly Bayes.

A learned reward model at or above this row has taken what the features say about the
attributes that drive choices; the rest of its gap to Bayes is what the image features cannot
see (or what the catalog labels say that the photos do not show). ``label_posteriors`` turns
catalog labels into certain readings, so the evaluation can read one attribute from the
features and take the others from the catalog: what reading that attribute alone costs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from reward.simulator import SimulatorSpec


def expected_utilities(spec: SimulatorSpec, posteriors: Mapping[str, np.ndarray],
                       labels: Mapping[str, Sequence[str]]) -> np.ndarray:
    """``[groups, items]`` expected utilities (groups in ``spec.groups`` order) from per-output
    probabilities ``[items, labels]``. An attribute the heads do not read adds nothing."""
    items = len(next(iter(posteriors.values())))

    def probability(attribute: str, value: str) -> np.ndarray:
        if attribute not in posteriors or value not in labels[attribute]:
            return np.zeros(items)
        return posteriors[attribute][:, list(labels[attribute]).index(value)]

    utilities = np.zeros((len(spec.groups), items))
    for g, taste in enumerate(spec.groups.values()):
        for attribute, weights in taste.utilities.items():
            if attribute in posteriors:
                utilities[g] += posteriors[attribute] @ np.array([weights.get(v, 0.0) for v in labels[attribute]])
        for interaction in taste.interactions:
            utilities[g] += interaction.weight * np.prod(
                [probability(attribute, value) for attribute, value in interaction.when.items()], axis=0)
    return utilities


def label_posteriors(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Certain readings ``[items, labels]`` of known values (one-hot; a value outside ``labels``: all zero)."""
    column = {label: j for j, label in enumerate(labels)}
    certain = np.zeros((len(values), len(labels)))
    for i, value in enumerate(values):
        if value in column:
            certain[i, column[value]] = 1.0
    return certain


def named_colour(brief: str, colours: Sequence[str]) -> str | None:
    """The colour a brief names (the longest match: "navy blue" before "blue"), if any."""
    text = f" {brief.lower()} "
    for colour in sorted(colours, key=len, reverse=True):
        if f" {colour.lower()} " in text:
            return colour
    return None


def reader_scores(spec: SimulatorSpec, group_ids: Sequence[str], briefs: Sequence[str], item_rows: np.ndarray,
                  posteriors: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[str]]) -> np.ndarray:
    """``[N, K]`` logits of the shown items (``item_rows`` index the posteriors' rows), each
    impression for its own group: expected utility / the simulator's temperature, so a softmax
    over them is the reader's choice probabilities, on the same scale as the simulator's."""
    utilities = expected_utilities(spec, posteriors, labels)
    group_row = {group: g for g, group in enumerate(spec.groups)}
    scores = utilities[np.array([group_row[g] for g in group_ids])[:, None], item_rows]
    colours = list(labels.get("colour", []))
    for i, brief in enumerate(briefs):
        if colours and (colour := named_colour(brief, colours)):
            scores[i] += spec.brief_colour_bonus * posteriors["colour"][item_rows[i], colours.index(colour)]
    return scores / spec.temperature
