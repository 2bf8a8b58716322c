"""Preference objectives for a diffusion model, on per-sample denoising errors.

For a noised latent ``x_t`` of candidate ``k`` the policy (UNet with the group's LoRA) and
the reference (the same UNet, adapters disabled) each have a denoising error
``e = ||eps - eps_hat(x_t, t)||^2`` (mean over the latent). Diffusion-DPO (Wallace et al.,
2023, eq. 14 as in diffusers' ``train_diffusion_dpo.py``) scores each candidate with the
implicit reward ``r_k = -beta / 2 * (e_policy_k - e_reference_k)`` and maximises
``log sigmoid(r_winner - r_loser)``. The listwise objective is the Plackett–Luce
likelihood of the whole ranking under the same implicit rewards,

    log P(ranking) = sum_{i < K} [ r_(i) - log sum_{j >= i} exp r_(j) ]

(candidates ordered best first), which is exactly DPO when K = 2. Noise and timestep are
shared by the candidates of one ranking, as DPO shares them between winner and loser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``[N]`` of ``[N, C, H, W]`` predictions."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def implicit_rewards(policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float) -> torch.Tensor:
    return -0.5 * beta * (policy_errors - reference_errors)


def diffusion_dpo_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and implicit accuracy for ``[B, 2]`` errors (column 0 the preferred candidate)."""
    rewards = implicit_rewards(policy_errors, reference_errors, beta)
    margin = rewards[:, 0] - rewards[:, 1]
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def plackett_luce_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of ``[B, K]`` rankings (best first) and the share of ordered pairs
    ``i < j`` whose implicit rewards agree (``r_i > r_j``)."""
    rewards = implicit_rewards(policy_errors, reference_errors, beta)
    suffix_logsumexp = torch.logcumsumexp(rewards.flip(1), dim=1).flip(1)
    loss = -(rewards - suffix_logsumexp)[:, :-1].sum(dim=1).mean()
    k = rewards.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
    agree = (rewards[:, :, None] > rewards[:, None, :])[:, upper]
    return loss, agree.float().mean()


def preference_loss(objective: str, policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``dpo``: the best against the worst candidate of each ranking; ``listwise``: the whole ranking."""
    if objective == "dpo":
        pair = [0, policy_errors.shape[1] - 1]
        return diffusion_dpo_loss(policy_errors[:, pair], reference_errors[:, pair], beta)
    if objective == "listwise":
        return plackett_luce_loss(policy_errors, reference_errors, beta)
    raise ValueError(f"unknown objective {objective!r}: 'dpo' or 'listwise'")
