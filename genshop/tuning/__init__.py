"""Preference tuning of the generator per customer group: Diffusion-DPO (Flow-DPO on flow
matching) and a listwise (Plackett–Luce) objective on LoRA adapters of the family's denoiser
(UNet or DiT), written on diffusers + peft + accelerate. ``losses`` holds the objectives,
``noise`` the forward processes (DDPM ε/v, flow matching), ``denoising`` each family's
training side (mixed into ``genshop.families``), ``tune`` the training loop; the LoRA files
and switching live in ``genshop.adapters``, which the workers share."""
