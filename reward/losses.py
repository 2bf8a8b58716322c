"""Losses on impressions: listwise softmax, pairwise Bradley–Terry, and their mix.

Shared shapes: ``rewards`` ``[B, K]`` (padding where ``mask`` is False), ``no_choice`` ``[B]``
(the logit of choosing none), ``chosen`` ``[B]`` (index of the chosen item, ``-1`` for none).

- listwise: cross-entropy of a softmax over the K shown items plus "none" (a multinomial
  logit, the model the choices are drawn from); a no-choice impression's target is "none".
- pairwise: Bradley–Terry ``-log sigmoid(r_winner - r_loser)`` over every (chosen, other shown)
  pair, averaged per impression; for a no-choice impression, "none" beats every item shown.
- mixed: ``weight * listwise + (1 - weight) * pairwise``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1e9


def _with_none(rewards: torch.Tensor, no_choice: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = rewards.masked_fill(~mask, NEG)
    return torch.cat([logits, no_choice[:, None]], dim=1)


def listwise_loss(rewards: torch.Tensor, no_choice: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    target = torch.where(chosen >= 0, chosen, torch.full_like(chosen, rewards.shape[1]))
    return F.cross_entropy(_with_none(rewards, no_choice, mask), target)


def pairwise_loss(rewards: torch.Tensor, no_choice: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    logits = _with_none(rewards, no_choice, mask)  # [B, K+1]
    k = rewards.shape[1]
    winner_index = torch.where(chosen >= 0, chosen, torch.full_like(chosen, k))
    winner = logits.gather(1, winner_index[:, None])  # [B, 1]
    losers = torch.arange(k, device=rewards.device)[None, :] != winner_index[:, None]  # [B, K]
    losers = losers & mask
    pair_losses = -F.logsigmoid(winner - rewards) * losers
    per_impression = pair_losses.sum(dim=1) / losers.sum(dim=1).clamp(min=1)
    return per_impression.mean()


def mixed_loss(rewards: torch.Tensor, no_choice: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor,
               weight: float = 0.5) -> torch.Tensor:
    return (weight * listwise_loss(rewards, no_choice, mask, chosen)
            + (1 - weight) * pairwise_loss(rewards, no_choice, mask, chosen))


def impression_loss(kind: str, rewards, no_choice, mask, chosen, mix_weight: float = 0.5) -> torch.Tensor:
    if kind == "listwise":
        return listwise_loss(rewards, no_choice, mask, chosen)
    if kind == "pairwise":
        return pairwise_loss(rewards, no_choice, mask, chosen)
    if kind == "mixed":
        return mixed_loss(rewards, no_choice, mask, chosen, mix_weight)
    raise ValueError(f"unknown loss {kind!r}: listwise, pairwise or mixed")
