"""Preference objectives for a diffusion model, on per-sample denoising errors.

For a noised latent ``x_t`` of candidate ``k`` the policy (the denoiser with the group's
LoRA) and the reference (the same denoiser, adapters disabled) each have a denoising error
``e = ||y - y_hat(x_t, t)||^2`` (mean over the latent) against the process's target ``y``
(``genshop.tuning.noise``): the noise ``eps`` for ε-prediction, the velocity
``sqrt(a_t) eps - sqrt(1 - a_t) x0`` for v-prediction, and for flow matching (SD3, FLUX)
the velocity ``v = eps - x0`` of ``x_t = (1 - s) x0 + s eps``. Diffusion-DPO (Wallace et
al., 2023, eq. 14 as in diffusers' ``train_diffusion_dpo.py``) scores each candidate with
the implicit reward ``r_k = -beta / 2 * (e_policy_k - e_reference_k)`` and maximises
``log sigmoid(r_winner - r_loser)``. Flow-DPO (Liu et al., 2025, "Improving Video
Generation with Human Feedback") is the same objective with the velocity error in place of
the ε error,

    r_k = -beta / 2 * (||v_k - v_theta(x_t,k, t)||^2 - ||v_k - v_ref(x_t,k, t)||^2),

with a constant beta (the paper's derivation gives ``beta_t = beta (1 - s)^2``, since
``eps_hat - eps = (1 - s)(v_hat - v)``; it reports the constant form to train better).
These functions take the errors, so one implementation serves every prediction type.

The listwise objective is the Plackett–Luce likelihood of the whole ranking under the same
implicit rewards,

    log P(ranking) = sum_{i < K} [ r_(i) - log sum_{j >= i} exp r_(j) ]

(candidates ordered best first), which is exactly DPO when K = 2. Noise and timestep are
shared by the candidates of one ranking, as DPO shares them between winner and loser.

Diffusion-KTO (Li et al., 2024, "Aligning Diffusion Models by Optimizing Human Utility")
learns from single images marked desirable or undesirable (clicks, purchases, a choice, or
the top and bottom of a sampled ranking), no pairs needed. With the same implicit reward
``r`` and a reference point ``z_ref = max(0, mean_batch r)`` (the batch's estimate of
``beta KL(policy || reference)``, no gradient), the Kahneman–Tversky value is
``sigma(r - z_ref)`` for a desirable image and ``sigma(z_ref - r)`` for an undesirable one,
and the loss

    L = mean_x  w(x) (1 - sigma(y(x) (r(x) - z_ref))),   y = +1 desirable, -1 undesirable,

with weights ``lambda_D`` and ``lambda_U`` (``w``, 1 by default; raise the rarer label's
weight when one kind dominates, KTO's ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]).

Default beta per prediction type (``default_beta``): 5000 for ε- and v-prediction (the
paper's SD 1.5 and SDXL value); 500 for flow matching: the ε-DPO strength carried over,
``5000 * E[(1 - s)^2]``, is about 560 under SD3's shifted logit-normal timestep sampling
(about 1460 under FLUX's unshifted one): the velocity error is the ε error without the
``(1 - s)^2`` that discounts low-noise timesteps, so the same beta would be ~10x stronger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


DEFAULT_BETA = {"epsilon": 5000.0, "v_prediction": 5000.0, "flow": 500.0}


def default_beta(prediction_type: str) -> float:
    """The objective's beta when none is given, by the denoiser's prediction type."""
    if prediction_type not in DEFAULT_BETA:
        raise ValueError(f"unknown prediction type {prediction_type!r}: one of {', '.join(DEFAULT_BETA)}")
    return DEFAULT_BETA[prediction_type]


def denoising_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error ``[N]`` of ``[N, ...]`` predictions (latents or packed tokens)."""
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


def ranking_labels(k: int) -> torch.Tensor:
    """KTO's labels of a ranking of ``k`` (best first): the top desirable (+1), the bottom
    undesirable (-1), any between unlabelled (0)."""
    labels = torch.zeros(k)
    labels[0], labels[-1] = 1.0, -1.0
    return labels


def diffusion_kto_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor, labels: torch.Tensor,
                       beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy (the share of labelled images on their label's side of ``z_ref``) for
    errors and ``labels`` of any one shape (+1 desirable, -1 undesirable, 0 left out)."""
    rewards = implicit_rewards(policy_errors, reference_errors, beta)
    labelled = labels != 0
    if not labelled.any():
        raise ValueError("KTO needs at least one image labelled desirable or undesirable")
    reference_point = rewards[labelled].mean().clamp(min=0).detach()
    sign = labels.to(rewards.dtype)
    margin = sign * (rewards - reference_point)
    weights = torch.where(labels > 0, desirable_weight, undesirable_weight).to(rewards.dtype)
    losses = weights * (1 - torch.sigmoid(margin))
    return losses[labelled].mean(), (margin[labelled] > 0).float().mean()


def preference_loss(objective: str, policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``dpo``: the best against the worst candidate of each ranking; ``listwise``: the whole ranking;
    ``kto``: single images by their ``labels`` (default: each ranking's top desirable, bottom undesirable)."""
    if objective == "kto":
        if labels is None:
            labels = ranking_labels(policy_errors.shape[1]).expand_as(policy_errors)
        return diffusion_kto_loss(policy_errors, reference_errors, labels.to(policy_errors.device), beta)
    if objective == "dpo":
        pair = [0, policy_errors.shape[1] - 1]
        return diffusion_dpo_loss(policy_errors[:, pair], reference_errors[:, pair], beta)
    if objective == "listwise":
        return plackett_luce_loss(policy_errors, reference_errors, beta)
    raise ValueError(f"unknown objective {objective!r}: 'dpo', 'listwise' or 'kto'")
