"""The forward noise processes the preference objectives train against, one per prediction type.

A process draws the training timesteps of a batch and builds, from clean latents ``x0`` and
noise ``eps`` of the same shape, the noised input the network sees and the target its
output is compared with:

- ``DiffusionProcess`` (SD 1.x, SDXL): DDPM, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with
  ``t`` uniform over the scheduler's training steps; the target is ``eps``
  (``prediction_type="epsilon"``) or the velocity ``sqrt(a_t) eps - sqrt(1 - a_t) x0``
  (``"v_prediction"``), as diffusers' trainers build them (``add_noise``, ``get_velocity``).
- ``FlowMatchingProcess`` (SD3, FLUX): rectified flow, ``x_t = (1 - s) x0 + s eps`` and the
  target velocity ``eps - x0`` (diffusers' flow-matching trainers: ``target = noise -
  model_input``). Timesteps are drawn as those trainers draw them:
  ``u ~ compute_density_for_timestep_sampling(weighting_scheme)`` (logit-normal by
  default), ``t = scheduler.timesteps[int(u * N)]``, so the scheduler's static ``shift``
  applies (SD3: 3.0) and a scheduler with ``use_dynamic_shifting`` (FLUX) trains unshifted,
  as ``train_dreambooth_lora_flux.py`` does. ``s = t / N``. The default scheme,
  ``logit_normal``, weighs every sample's loss 1 (``compute_loss_weighting_for_sd3``).

Both take a ``torch.Generator`` so a step is reproducible, and return timesteps in the
scheduler's units (``[0, N)``); the family converts them to what its network takes.
"""

from __future__ import annotations

import torch

DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW = "flow"


class DiffusionProcess:
    """DDPM noising with the scheduler's betas; ε- or v-prediction from its config."""

    def __init__(self, scheduler_config: dict, prediction_type: str | None = None):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = prediction_type or self.scheduler.config.prediction_type
        if self.prediction_type not in DDPM_PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}: one of {DDPM_PREDICTION_TYPES}")
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(x0, noise, timesteps)


class FlowMatchingProcess:
    """Rectified-flow noising on the scheduler's (possibly shifted) training sigmas; velocity targets."""

    prediction_type = FLOW

    def __init__(self, scheduler_config: dict, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.timesteps = self.scheduler.timesteps.clone()  # the training table: sigmas * N, descending
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = (
            weighting_scheme, logit_mean, logit_std, mode_scale)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.timesteps[indices]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigmas(timesteps).to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - sigma) * x0 + sigma * noise, noise - x0
