"""Losses and metrics equal a direct computation on small tensors; padding and no-choice are handled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reward.losses import listwise_loss, mixed_loss, pairwise_loss
from reward.metrics import accuracy, bayes_expected_accuracy, expected_calibration_error, log_loss

REWARDS = torch.tensor([[2.0, 0.5, -1.0, 7.0], [0.0, 1.0, 3.0, 0.3], [1.5, -0.5, 0.2, -9.0]])
NO_CHOICE = torch.tensor([0.3, -0.2, 1.0])
MASK = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, False]])
CHOSEN = torch.tensor([1, 2, -1])  # the third impression: chose none


def direct_listwise() -> float:
    total = 0.0
    for r, n, m, c in zip(REWARDS.tolist(), NO_CHOICE.tolist(), MASK.tolist(), CHOSEN.tolist()):
        shown = [x for x, keep in zip(r, m) if keep]
        denominator = sum(math.exp(x) for x in shown) + math.exp(n)
        total += -math.log((math.exp(r[c]) if c >= 0 else math.exp(n)) / denominator)
    return total / len(CHOSEN)


def direct_pairwise() -> float:
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    total = 0.0
    for r, n, m, c in zip(REWARDS.tolist(), NO_CHOICE.tolist(), MASK.tolist(), CHOSEN.tolist()):
        winner = r[c] if c >= 0 else n
        losers = [x for j, (x, keep) in enumerate(zip(r, m)) if keep and j != c]
        total += sum(-math.log(sigmoid(winner - x)) for x in losers) / len(losers)
    return total / len(CHOSEN)


def test_listwise_equals_softmax_over_shown_items_and_none():
    assert listwise_loss(REWARDS, NO_CHOICE, MASK, CHOSEN).item() == pytest.approx(direct_listwise(), rel=1e-6)


def test_pairwise_equals_bradley_terry_over_chosen_pairs_and_none_beats_all():
    assert pairwise_loss(REWARDS, NO_CHOICE, MASK, CHOSEN).item() == pytest.approx(direct_pairwise(), rel=1e-6)


def test_mixed_is_the_weighted_sum_and_padding_does_not_matter():
    expected = 0.3 * direct_listwise() + 0.7 * direct_pairwise()
    assert mixed_loss(REWARDS, NO_CHOICE, MASK, CHOSEN, weight=0.3).item() == pytest.approx(expected, rel=1e-6)
    changed = REWARDS.clone()
    changed[~MASK] = 123.0  # whatever sits in padded slots is ignored
    for loss in (listwise_loss, pairwise_loss):
        assert loss(changed, NO_CHOICE, MASK, CHOSEN).item() == pytest.approx(loss(REWARDS, NO_CHOICE, MASK, CHOSEN).item())


def test_accuracy_counts_ties_half_and_skips_no_choice():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 3.0, 3.0], [5.0, 0.0, 0.0]])
    mask = np.ones_like(scores, dtype=bool)
    chosen = np.array([0, 2, 1, -1])
    assert accuracy(scores, mask, chosen) == pytest.approx((0.5 + 0.0 + 1 / 3) / 3)


def test_log_loss_calibration_and_bayes_ceiling_match_direct_values():
    scores = np.log(np.array([[0.65, 0.25, 0.1], [0.2, 0.45, 0.35]]))
    mask = np.ones_like(scores, dtype=bool)
    chosen = np.array([0, 2])
    assert log_loss(scores, mask, chosen) == pytest.approx(-(math.log(0.65) + math.log(0.35)) / 2)
    # confidences 0.65 (right) and 0.45 (wrong) fall in different bins: (|1 - 0.65| + |0 - 0.45|) / 2
    assert expected_calibration_error(scores, mask, chosen, bins=10) == pytest.approx((0.35 + 0.45) / 2)
    truth = np.array([[0.5, 0.2, 0.1, 0.2], [0.1, 0.1, 0.4, 0.4]])  # last column: none
    assert bayes_expected_accuracy(truth) == pytest.approx((0.5 + 0.4) / (0.8 + 0.6))
