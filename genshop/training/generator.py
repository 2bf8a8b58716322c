"""Train a small latent text-to-image model on the catalog, saved in the Stable Diffusion layout.

``train_generator(config, progress)`` runs two resumable stages into ``config.out``:

1. **VAE** (skipped when ``vae`` names a trained one): an ``AutoencoderKL``
   (``configs/generator/vae.json``) learns to compress the
   catalog photos (resized to ``width`` x ``height``, 3:4 like the originals) with an L1
   reconstruction loss and a small KL term. Every training image is then encoded once and
   its latent mean and std cached; the latents' spread sets the VAE ``scaling_factor``.
2. **UNet**: a ``UNet2DConditionModel`` (``configs/generator/unet.json``) learns to
   denoise those latents (epsilon prediction, DDPM noise schedule, min-SNR weighting),
   cross-attending to the frozen text tower of the project's domain CLIP, exported as a
   ``transformers.CLIPTextModel``. Captions are titles with random attribute phrases; a
   share of them is dropped to the empty prompt so classifier-free guidance works. An EMA
   of the weights is kept and becomes the shipped UNet.

The result, ``out/pipeline``, is a plain ``StableDiffusionPipeline`` folder (VAE, UNet,
CLIP text encoder, tokenizer, Euler scheduler): ``from_pretrained`` loads it without
genshop. Both stages checkpoint (safetensors) and resume; losses go to JSONL logs and
PNG curves; a fixed-prompt sample grid is written every ``sample_every`` steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from genshop.catalog_data import decode_image, read_catalog, rows_as_dicts, sample_caption
from genshop.settings import REPO_ROOT
from genshop.training.checkpoint import has_training_state, load_training_state, save_training_state
from genshop.run_log import append_log, read_log, truncate_log

ProgressCallback = Callable[[str, int, int, dict], None]  # (stage, step, total, metrics)

SAMPLE_PROMPTS = (
    "Men Black Leather Wallet",
    "Women Red Kurta",
    "Men White Sports Shoes",
    "Women Blue Jeans",
    "Unisex Black Backpack",
    "Women Pink Handbag",
    "Men Navy Blue Tshirt",
    "Women Gold Watch",
)


class GeneratorTrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[str] = Field(min_length=1, description="catalog parquet files (train split)")
    clip: str = Field(description="the domain CLIP folder (open_clip layout) whose text tower conditions the UNet")
    out: str
    width: int = Field(default=72, ge=16)
    height: int = Field(default=96, ge=16)
    vae: str | None = Field(default=None, description="a trained AutoencoderKL folder to reuse: skips the VAE stage")
    vae_config: str = "configs/generator/vae.json"
    unet_config: str = "configs/generator/unet.json"
    scheduler_config: str = "configs/generator/scheduler.json"
    vae_steps: int = Field(default=1500, ge=0)
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = Field(default=12000, ge=0)
    unet_batch_size: int = 64
    unet_learning_rate: float = 6e-4
    warmup_steps: int = 300
    caption_dropout: float = Field(default=0.1, ge=0, le=1)
    min_snr_gamma: float | None = 5.0
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    checkpoint_every: int = 250
    sample_every: int = 2000
    max_items: int | None = Field(default=None, description="use only the first N catalog rows (quick runs, tests)")
    save_dtype: Literal["float32", "float16"] = Field(
        default="float16", description="weights of the saved pipeline (from_pretrained loads them as float32 unless told)")
    seed: int = 0
    threads: int | None = None

    @classmethod
    def from_recipe(cls, path: str | Path, **overrides) -> "GeneratorTrainingConfig":
        recipe = json.loads(Path(path).read_text())
        return cls(**{**recipe, **{k: v for k, v in overrides.items() if v is not None}})


def _config_path(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() or candidate.exists() else REPO_ROOT / candidate


def read_json(path: str) -> dict:
    return json.loads(_config_path(path).read_text())


# ------------------------------------------------------------------------- data

def catalog_pixels(frame, width: int, height: int, cache: Path) -> torch.Tensor:
    """Every catalog image resized to ``width`` x ``height`` as uint8 ``[n, 3, h, w]``, cached."""
    if cache.is_file():
        pixels = load_file(str(cache))["pixels"]
        if len(pixels) == len(frame):
            return pixels
    pixels = torch.stack([
        torch.from_numpy(np.array(decode_image(data).resize((width, height), Image.BICUBIC))).permute(2, 0, 1)
        for data in frame["image"]
    ])
    save_file({"pixels": pixels.contiguous()}, str(cache))
    return pixels


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------- stage 1: VAE

def train_vae(config: GeneratorTrainingConfig, pixels: torch.Tensor, out: Path, progress: ProgressCallback | None):
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    vae = AutoencoderKL.from_config(read_json(config.vae_config))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    state_dir, log = out / "vae-state", out / "log-vae.jsonl"
    step = load_training_state(state_dir, vae, optimizer)["step"] if has_training_state(state_dir) else 0
    truncate_log(log, step)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    rng = torch.Generator().manual_seed(config.seed + step)
    while step < config.vae_steps:
        index = torch.randint(len(pixels), (config.vae_batch_size,), generator=rng)
        images = to_model_range(pixels[index]).to(accelerator.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.vae_learning_rate, config.warmup_steps // 3, config.vae_steps)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(reconstruction, images)
        kl = posterior.kl().mean() / images[0].numel()
        loss = l1 + config.kl_weight * kl * images[0].numel()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        step += 1
        metrics = {"stage": "vae", "step": step, "loss": loss.item(), "l1": l1.item(), "kl": kl.item(),
                   "lr": optimizer.param_groups[0]["lr"]}
        append_log(log, metrics)
        if progress:
            progress("vae", step, config.vae_steps, metrics)
        if step % config.checkpoint_every == 0 or step == config.vae_steps:
            save_training_state(state_dir, accelerator.unwrap_model(vae), optimizer, step)
    return accelerator.unwrap_model(vae).eval()


@torch.inference_mode()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(to_model_range(pixels[start:start + batch_size]).to(vae.device)).latent_dist
        means.append(dist.mean.half().cpu())
        stds.append(dist.std.half().cpu())
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------- stage 2: UNet

def load_text_encoder(clip_dir: str | Path, work: Path):
    """The domain CLIP's text tower as ``CLIPTextModel`` plus its tokenizer (exported once into ``work``)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from genshop.training.text_export import export_text_encoder

    weights = sorted(Path(clip_dir).glob("*.safetensors"))
    fingerprint = hashlib.sha256("".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights).encode())
    export = work / f"text-export-{fingerprint.hexdigest()[:10]}"  # a retrained CLIP is exported anew
    if not (export / "text_encoder" / "config.json").is_file():
        export_text_encoder(clip_dir, export)
    text_encoder = CLIPTextModel.from_pretrained(export / "text_encoder").eval().requires_grad_(False)
    return text_encoder, CLIPTokenizer.from_pretrained(export / "tokenizer")


def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt")
    with torch.no_grad():  # not inference_mode: the result feeds a UNet that is being trained
        return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    if gamma is None:
        return torch.ones(len(timesteps))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def assemble_pipeline(vae, unet, text_encoder, tokenizer, scheduler_config: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def sample_grid(pipeline, width: int, height: int, path: Path, prompts: Sequence[str] = SAMPLE_PROMPTS,
                seeds: Sequence[int] = (0, 1, 2, 3), steps: int = 25, guidance: float = 4.0) -> Path:
    from genshop.contact_sheet import save_contact_sheet

    pipeline.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipeline([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, width=width,
                          height=height, generator=generators).images
        rows.append((prompt, images))
    return save_contact_sheet(rows, path)


def train_unet(config: GeneratorTrainingConfig, vae, latents: tuple[torch.Tensor, torch.Tensor], captions: list[dict],
               out: Path, progress: ProgressCallback | None):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    scheduler_config = read_json(config.scheduler_config)
    noise_scheduler = DDPMScheduler.from_config({k: v for k, v in scheduler_config.items()
                                                 if k not in ("_class_name", "timestep_spacing", "steps_offset")})
    text_encoder, tokenizer = load_text_encoder(config.clip, out)
    text_encoder.to(accelerator.device)
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel.from_config(read_json(config.unet_config))
    ema = UNet2DConditionModel.from_config(read_json(config.unet_config))
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_learning_rate, weight_decay=0.01)
    state_dir, log = out / "unet-state", out / "log-unet.jsonl"
    step = 0
    if has_training_state(state_dir):
        step = load_training_state(state_dir, unet, optimizer)["step"]
        ema.load_state_dict(load_file(str(state_dir / "ema.safetensors")))
    truncate_log(log, step)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.to(accelerator.device)
    mean, std = latents
    scaling = vae.config.scaling_factor
    rng = torch.Generator().manual_seed(config.seed + 1000 + step)
    caption_rng = random.Random(config.seed + step)
    started = time.time()
    while step < config.unet_steps:
        index = torch.randint(len(mean), (config.unet_batch_size,), generator=rng)
        x0 = (mean[index].float() + std[index].float() * torch.randn(mean[index].shape, generator=rng)) * scaling
        x0 = x0.to(accelerator.device)
        prompts = ["" if caption_rng.random() < config.caption_dropout else sample_caption(captions[i], caption_rng)
                   for i in index.tolist()]
        conditioning = encode_prompts(text_encoder, tokenizer, prompts)
        noise = torch.randn(x0.shape, generator=rng).to(accelerator.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=rng)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.unet_learning_rate, config.warmup_steps, config.unet_steps)
        prediction = unet(noisy, timesteps.to(accelerator.device), conditioning).sample
        per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(noise_scheduler, timesteps, config.min_snr_gamma).to(per_sample)).mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        step += 1
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for ema_param, param in zip(ema.parameters(), accelerator.unwrap_model(unet).parameters()):
                ema_param.lerp_(param.detach(), 1 - decay)
        metrics = {"stage": "unet", "step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": round(config.unet_batch_size * step / max(1e-6, time.time() - started), 1)}
        append_log(log, metrics)
        if progress:
            progress("unet", step, config.unet_steps, metrics)
        if step % config.checkpoint_every == 0 or step == config.unet_steps:
            save_training_state(state_dir, accelerator.unwrap_model(unet), optimizer, step)
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                      str(state_dir / "ema.safetensors"))
        if step % config.sample_every == 0 or step == config.unet_steps:
            pipeline = assemble_pipeline(vae, ema, text_encoder, tokenizer, scheduler_config)
            sample_grid(pipeline, config.width, config.height, out / f"samples-step{step:06d}.png")
    return ema.eval(), text_encoder, tokenizer, scheduler_config


# ------------------------------------------------------------------------- the whole run

def plot_generator_curves(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, name, title in ((axes[0], "log-vae.jsonl", "VAE loss (L1 + KL)"), (axes[1], "log-unet.jsonl", "UNet loss (min-SNR eps MSE)")):
        records = read_log(out / name)
        if records:
            steps = [r["step"] for r in records]
            losses = [r["loss"] for r in records]
            window = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps, losses, alpha=0.25)
            ax.plot(steps[window - 1:], smooth)
        ax.set(title=title, xlabel="step", yscale="log")
    fig.tight_layout()
    path = out / "loss-curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def compute_in_float32(config_file: Path) -> None:
    """Half-precision weights, float32 compute: diffusers casts its models to float32 when no
    dtype is asked for, transformers follows the config's dtype, so that must say float32 too."""
    data = json.loads(config_file.read_text())
    data.update({key: "float32" for key in ("torch_dtype", "dtype") if key in data})
    config_file.write_text(json.dumps(data, indent=2) + "\n")


def train_generator(config: GeneratorTrainingConfig, progress: ProgressCallback | None = None) -> Path:
    """Run (or resume) both stages and write ``out/pipeline``; returns that folder
    (or ``out`` itself when ``unet_steps`` is 0: the VAE stage alone)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    frame = read_catalog(config.data)
    if config.max_items:
        frame = frame.iloc[: config.max_items].reset_index(drop=True)
    pixels = catalog_pixels(frame, config.width, config.height, out / f"pixels-{len(frame)}.safetensors")
    if config.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(config.vae).eval()
    else:
        vae = train_vae(config, pixels, out, progress)
        vae.save_pretrained(out / "vae", safe_serialization=True)

    vae_id = hashlib.sha256(str(config.vae or config.vae_steps).encode()).hexdigest()[:8]
    latents_file = out / f"latents-{len(frame)}-{vae_id}.safetensors"
    if latents_file.is_file():
        cached = load_file(str(latents_file))
        mean, std = cached["mean"], cached["std"]
    else:
        mean, std = encode_latents(vae, pixels)
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(latents_file))
    vae.register_to_config(scaling_factor=float(1.0 / mean.float().std()))
    if config.unet_steps == 0:  # VAE stage only (e.g. while the domain CLIP is still training)
        plot_generator_curves(out)
        return out

    unet, text_encoder, tokenizer, scheduler_config = train_unet(config, vae, (mean, std), rows_as_dicts(frame), out,
                                                                 progress)
    pipeline = assemble_pipeline(vae, unet, text_encoder, tokenizer, scheduler_config)
    pipeline.to(dtype=getattr(torch, config.save_dtype))
    pipeline.save_pretrained(out / "pipeline", safe_serialization=True)
    compute_in_float32(out / "pipeline" / "text_encoder" / "config.json")
    plot_generator_curves(out)
    return out / "pipeline"
