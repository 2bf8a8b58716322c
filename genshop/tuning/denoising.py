"""The training side of each model family: what ``genshop tune`` needs beyond the pipeline.

One class per family, mixed into the family classes of ``genshop.families`` (so a family
object answers both generation's questions and these; ``text_max_length`` is the
family's), each with:

- ``noise_process(pipeline)``: the forward process and prediction type
  (``genshop.tuning.noise``): DDPM ε/v for SD 1.x and SDXL (from the scheduler's
  ``prediction_type``), flow matching for SD3 and FLUX (the scheduler's training sigmas,
  logit-normal timesteps, velocity ``eps - x0``);
- ``encode_prompts(pipeline, prompts, size, max_sequence_length)``: batch-first conditioning tensors, one row per
  prompt, no classifier-free guidance (what the network takes besides ``x_t`` and ``t``).
  SD: ``encoder_hidden_states``; SDXL: those (both CLIPs) + the pooled ``text_embeds`` and
  ``time_ids`` (original size, crop (0, 0), target size) of its added conditioning; SD3: the
  joint CLIP×2 + T5 embeddings and ``pooled_projections``; FLUX: T5 embeddings, the CLIP
  pooled projection and, on a guidance-distilled transformer, the ``guidance`` scale;
- ``prediction(denoiser, noisy, timesteps, conditioning)``: the network call on ``[N, C, H, W]``
  latents, timesteps in the scheduler's units, as the family's pipeline makes it (SD3: the
  timestep itself; FLUX: packed 2×2 latent patches, ``t / 1000``, text and image position
  ids, unpacked again);
- ``ranking_latents(pipeline, latents, height, width)``: what the pipeline returns for
  ``output_type="latent"`` as ``[N, C, H, W]`` (FLUX's packed tokens unpacked), and
  ``decode_latents`` / ``encode_images`` between those and images through the VAE
  (``x / scaling_factor + shift_factor`` and back: SD3 and FLUX have a shift).
"""

from __future__ import annotations

import torch

from genshop.tuning.noise import DiffusionProcess, FlowMatchingProcess


def _vae_scale(vae) -> tuple[float, float]:
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def vae_scale_factor(pipeline) -> int:
    return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


class UNetTraining:
    """SD 1.x/2.x: a UNet with cross-attention on one CLIP's hidden states; DDPM ε or v."""

    def noise_process(self, pipeline):
        return DiffusionProcess(pipeline.scheduler.config)

    def encode_prompts(self, pipeline, prompts: list[str], size: tuple[int, int],
                       max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """Conditioning rows of ``prompts`` for images of ``size`` (height, width); the T5 length
        as generation uses it (the preset's, else the family's default, ``text_max_length``)."""
        return {"encoder_hidden_states": pipeline.encode_prompt(prompts, pipeline.device, 1, False)[0]}

    def prediction(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        return denoiser(noisy, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample

    def ranking_latents(self, pipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    @torch.no_grad()
    def decode_latents(self, pipeline, latents: torch.Tensor) -> list:
        vae = pipeline.vae
        scaling, shift = _vae_scale(vae)
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            images = vae.decode((latents / scaling + shift).to(vae.device, dtype)).sample
        finally:
            if upcast:
                vae.to(torch.float16)
        return pipeline.image_processor.postprocess(images.float(), output_type="pil")

    @torch.no_grad()
    def encode_images(self, pipeline, images: list) -> torch.Tensor:
        """``[N, C, H, W]`` latents (the distributions' means) of PIL images already at the training size."""
        vae = pipeline.vae
        scaling, shift = _vae_scale(vae)
        pixels = pipeline.image_processor.preprocess(images).to(vae.device, vae.dtype)
        return ((vae.encode(pixels).latent_dist.mean - shift) * scaling).float().cpu()


class SDXLTraining(UNetTraining):
    """SDXL: the UNet also takes the pooled text embedding and the size/crop ``time_ids``."""

    def encode_prompts(self, pipeline, prompts, size, max_sequence_length=None):
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, device=pipeline.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        projection_dim = (pipeline.text_encoder_2.config.projection_dim if pipeline.text_encoder_2 is not None
                          else int(pooled.shape[-1]))
        time_ids = pipeline._get_add_time_ids(tuple(size), (0, 0), tuple(size), dtype=embeds.dtype,
                                              text_encoder_projection_dim=projection_dim)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": time_ids.to(embeds.device).expand(len(prompts), -1)}

    def prediction(self, denoiser, noisy, timesteps, conditioning):
        return denoiser(noisy, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": conditioning["text_embeds"],
                                           "time_ids": conditioning["time_ids"]}).sample


class SD3Training(UNetTraining):
    """SD3/3.5: an MMDiT on CLIP-L + CLIP-G + T5 embeddings and their pooled projection; flow matching."""

    def noise_process(self, pipeline):
        return FlowMatchingProcess(pipeline.scheduler.config)

    def encode_prompts(self, pipeline, prompts, size, max_sequence_length=None):
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, None, None, device=pipeline.device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                      max_sequence_length=self.text_max_length(pipeline,
                                                                                               max_sequence_length))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def prediction(self, denoiser, noisy, timesteps, conditioning):
        return denoiser(hidden_states=noisy, timestep=timesteps.to(noisy.dtype),
                        encoder_hidden_states=conditioning["encoder_hidden_states"],
                        pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]


class FluxTraining(UNetTraining):
    """FLUX.1: a DiT on packed 2×2 latent patches, T5 tokens and the CLIP pooled vector; flow matching."""

    guidance_scale = 3.5  # diffusers' FLUX trainers' default for a guidance-distilled transformer

    def noise_process(self, pipeline):
        return FlowMatchingProcess(pipeline.scheduler.config)

    def encode_prompts(self, pipeline, prompts, size, max_sequence_length=None):
        embeds, pooled, _ = pipeline.encode_prompt(prompts, None, device=pipeline.device, num_images_per_prompt=1,
                                                   max_sequence_length=self.text_max_length(pipeline,
                                                                                            max_sequence_length))
        conditioning = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if pipeline.transformer.config.guidance_embeds:
            conditioning["guidance"] = torch.full((len(prompts),), self.guidance_scale, device=embeds.device)
        return conditioning

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        n, c, h, w = latents.shape
        return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, _, channels = tokens.shape
        return tokens.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels // 4, h, w)

    def prediction(self, denoiser, noisy, timesteps, conditioning):
        n, _, h, w = noisy.shape
        image_ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device, dtype=noisy.dtype)
        image_ids[..., 1] += torch.arange(h // 2, device=noisy.device)[:, None]
        image_ids[..., 2] += torch.arange(w // 2, device=noisy.device)[None, :]
        text = conditioning["encoder_hidden_states"]
        guidance = conditioning.get("guidance")
        out = denoiser(hidden_states=self.pack(noisy), timestep=timesteps.to(noisy.dtype) / 1000,
                       guidance=guidance.to(noisy.dtype) if guidance is not None else None,
                       pooled_projections=conditioning["pooled_projections"], encoder_hidden_states=text,
                       txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                       img_ids=image_ids.reshape(-1, 3), return_dict=False)[0]
        return self.unpack(out, h, w)

    def ranking_latents(self, pipeline, latents, height, width):
        if latents.ndim == 4:
            return latents
        factor = vae_scale_factor(pipeline)
        return self.unpack(latents, 2 * (height // (factor * 2)), 2 * (width // (factor * 2)))
