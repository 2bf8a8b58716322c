"""Preference metrics on score matrices: accuracy (ties count half), log-loss, calibration, Bayes ceiling.

Conventions shared by every function here: ``scores`` is ``[N, K]`` (higher = more likely to be
chosen; entries where ``mask`` is False are padding and ignored), ``chosen`` is ``[N]`` with the
index of the chosen item or ``-1`` for "chose none". Accuracy, the conditional log-loss and
calibration are computed over impressions with a choice: did the model rank the chosen item
first among those shown? When t items tie for the top score and the chosen one is among them,
the impression counts 1/t (so ties are worth exactly what a random tie-break is worth).
"""

from __future__ import annotations

import numpy as np

from genshop.metrics import expected_calibration_error as binned_calibration_error


def _masked(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, scores.astype(np.float64), -np.inf)


def top_choice_credit(scores: np.ndarray, mask: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per impression with a choice: 1/t if the chosen item is among the t top-scored items, else 0."""
    has_choice = chosen >= 0
    s = _masked(scores, mask)[has_choice]
    c = chosen[has_choice]
    top = s.max(axis=1, keepdims=True)
    tied = np.isclose(s, top, rtol=1e-6, atol=1e-9) & np.isfinite(s)
    return tied[np.arange(len(c)), c] / tied.sum(axis=1)


def accuracy(scores: np.ndarray, mask: np.ndarray, chosen: np.ndarray) -> float:
    credit = top_choice_credit(scores, mask, chosen)
    return float(credit.mean()) if len(credit) else float("nan")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def choice_probabilities(scores: np.ndarray, mask: np.ndarray, no_choice: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the shown items (and a last column for "none" when ``no_choice`` logits are given)."""
    s = _masked(scores, mask)
    if no_choice is not None:
        s = np.concatenate([s, np.asarray(no_choice, dtype=np.float64)[:, None]], axis=1)
    return softmax(s, axis=1)


def log_loss(scores: np.ndarray, mask: np.ndarray, chosen: np.ndarray, no_choice: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of what happened.

    Without ``no_choice``: over impressions with a choice, of the chosen item among those shown
    (comparable across every model, baselines included). With it: over all impressions, the
    K + 1 outcomes including "none".
    """
    if no_choice is None:
        rows = chosen >= 0
        p = choice_probabilities(scores[rows], mask[rows])
        picked = p[np.arange(rows.sum()), chosen[rows]]
    else:
        p = choice_probabilities(scores, mask, no_choice)
        target = np.where(chosen >= 0, chosen, scores.shape[1])
        picked = p[np.arange(len(chosen)), target]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean()) if len(picked) else float("nan")


def expected_calibration_error(scores: np.ndarray, mask: np.ndarray, chosen: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 prediction: |accuracy - confidence| averaged over equal-width confidence bins.

    Confidence is the softmax probability of the top item among those shown (conditional on a choice).
    """
    rows = chosen >= 0
    if not rows.any():
        return float("nan")
    p = choice_probabilities(scores[rows], mask[rows])
    confidence = p.max(axis=1)
    return binned_calibration_error(confidence, top_choice_credit(scores, mask, chosen), bins)


def bayes_expected_accuracy(probabilities: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Expected accuracy of always predicting the truly most likely item, over impressions with a choice.

    ``probabilities`` is ``[N, K + 1]``: the true P(item k) for each shown item, then P(none).
    Impressions weigh by their chance of having a choice: sum_i max_k p_ik / sum_i (1 - p_i,none).
    """
    items = probabilities[:, :-1]
    if mask is not None:
        items = np.where(mask, items, 0.0)
    return float(items.max(axis=1).sum() / (1.0 - probabilities[:, -1]).sum())
