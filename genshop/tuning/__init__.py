"""Preference tuning of the generator per customer group: Diffusion-DPO and a listwise
(Plackett–Luce) objective on LoRA adapters of the UNet, written on diffusers + peft +
accelerate. ``losses`` holds the objectives, ``tune`` the training loop; the LoRA files and
switching live in ``genshop.adapters``, which the workers share."""
