"""``genshop tune``: a LoRA per customer group, trained on the group reward model's preferences.

One run tunes one group. Top to bottom:

1. Load the base pipeline (a preset, like the workers), the briefs and the reward model;
   add a fresh LoRA (``adapters.add_group_adapter``): the only trainable weights.
2. Each round (online): for every brief, sample ``candidates`` images from the current
   policy (the pipeline with the adapter), score them for the group, and keep their
   latents ranked best first. Offline (``preferences``): impressions of the reward
   format whose items are image files (e.g. an A/B import) give, per impression, the
   chosen image against each other one shown; their latents come from the VAE.
3. Train on the rankings: the same noise and timestep for the candidates of a ranking,
   denoising errors of the policy and of the reference (the same UNet with adapters
   disabled: no second copy in memory), and the chosen objective (``losses``).
4. Checkpoints (LoRA + optimizer, safetensors) every ``checkpoint_every`` steps and at
   the end of each round, with the round's rankings cached, so a killed run resumes
   where it stopped. The adapter is saved in the diffusers LoRA format into
   ``out/adapter``; loss and implicit-accuracy curves and before/after sample grids go
   to ``out`` as PNG.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file

from genshop.briefs import Brief, parse_brief, resolve_brief
from genshop.generation import build_prompt
from genshop.run_log import append_log, read_log, truncate_log
from genshop.training.checkpoint import has_training_state, load_training_state, save_training_state
from genshop.adapters import add_group_adapter, save_group_adapter
from genshop.tuning.losses import denoising_errors, preference_loss

ProgressCallback = Callable[[str, int, int, dict], None]  # (stage, done, total, metrics)


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: str = Field(min_length=1)
    briefs: Path = Field(description="YAML: a list of briefs (the brief schema); their prompts are tuned on")
    reward: Path = Field(description="group reward model folder")
    out: Path
    preset: str | None = Field(default=None, description="generation preset of the base pipeline (default: settings)")
    objective: Literal["dpo", "listwise"] = "dpo"
    preferences: list[Path] = Field(default_factory=list,
                                    description="offline: impressions files (items = image files) instead of sampling")
    candidates: int = Field(default=4, ge=2, description="K images sampled per brief and round")
    rounds: int = Field(default=1, ge=1)
    steps_per_round: int = Field(default=100, ge=1)
    batch_size: int = Field(default=2, ge=1, description="rankings per step")
    learning_rate: float = Field(default=1e-4, gt=0)
    beta: float = Field(default=5000.0, gt=0, description="Diffusion-DPO's beta (the paper's SD 1.5 value)")
    rank: int = Field(default=4, ge=1)
    inference_steps: int | None = None
    guidance_scale: float | None = None
    checkpoint_every: int = Field(default=50, ge=1)
    seed: int = 0
    threads: int | None = None


class Ranking(BaseModel):
    """One prompt's candidates, best first: their rewards here, their latents beside (same order)."""

    prompt: str
    rewards: list[float]


def load_tune_briefs(path: Path, preset, seed: int, **overrides) -> list[Brief]:
    """The briefs of a YAML list, resolved against the preset; ``overrides`` that are not None replace fields."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    entries = data if isinstance(data, list) else [data]
    rng = random.Random(seed)
    briefs = [parse_brief(entry, f"{path}[{i}]") for i, entry in enumerate(entries)]
    return [resolve_brief(b.model_copy(update={k: v for k, v in overrides.items() if v is not None}), preset, rng)
            for b in briefs]


# ---------------------------------------------------------------- rankings

@torch.no_grad()
def decode_latents(pipeline, latents: torch.Tensor) -> list:
    images = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    return pipeline.image_processor.postprocess(images, output_type="pil")


@torch.no_grad()
def sample_rankings(pipeline, briefs: list[Brief], group: str, scorer, k: int, seed: int
                    ) -> tuple[list[Ranking], torch.Tensor]:
    """Sample ``k`` candidates per brief from the current pipeline and rank them by the group's reward."""
    from reward.scoring import score_images

    model, embedder = scorer
    rankings, latents = [], []
    for i, brief in enumerate(briefs):
        prompt = build_prompt(brief)
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        sampled = pipeline(prompt, num_images_per_prompt=k, num_inference_steps=brief.steps,
                           guidance_scale=brief.guidance_scale, width=brief.width, height=brief.height,
                           generator=generator, output_type="latent").images
        rewards = score_images(model, embedder, decode_latents(pipeline, sampled), prompt, [group])[group].rewards
        order = np.argsort(rewards)[::-1].copy()
        rankings.append(Ranking(prompt=prompt, rewards=[rewards[j] for j in order]))
        latents.append(sampled[torch.from_numpy(order)].cpu())
    return rankings, torch.stack(latents)


@torch.no_grad()
def preference_rankings(pipeline, paths: list[Path], group: str, width: int, height: int
                        ) -> tuple[list[Ranking], torch.Tensor]:
    """Offline pairs from impressions: the chosen image against each other one shown (K = 2)."""
    from PIL import Image

    from reward.impressions import read_impression_files

    frame = read_impression_files(paths)
    frame = frame[(frame["group_id"] == group) & frame["chosen"].notna()]
    if frame.empty:
        raise ValueError(f"no impressions with a choice for group {group!r} in {', '.join(map(str, paths))}")
    cache: dict[str, torch.Tensor] = {}

    def latent(path: str) -> torch.Tensor:
        if path not in cache:
            image = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
            pixels = pipeline.image_processor.preprocess(image).to(pipeline.device, pipeline.vae.dtype)
            cache[path] = pipeline.vae.encode(pixels).latent_dist.mean[0].cpu() * pipeline.vae.config.scaling_factor
        return cache[path]

    rankings, latents = [], []
    for row in frame.itertuples():
        for other in row.items:
            if other != row.chosen:
                rankings.append(Ranking(prompt=row.brief, rewards=[1.0, 0.0]))
                latents.append(torch.stack([latent(row.chosen), latent(other)]))
    return rankings, torch.stack(latents)


# ---------------------------------------------------------------- one step

def preference_step(unet, noise_scheduler, latents: torch.Tensor, conditioning: torch.Tensor, objective: str,
                    beta: float, generator: torch.Generator, reference_unet=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and implicit accuracy on ``[B, K, C, H, W]`` ranked latents with ``[B, L, D]`` prompt embeddings.

    The reference is ``unet`` with its adapters disabled, or ``reference_unet`` when given
    (the original Diffusion-DPO structure, which ``bench/dpo.py`` compares against)."""
    b, k = latents.shape[:2]
    x0 = latents.flatten(0, 1)
    noise = torch.randn((b, 1, *latents.shape[2:]), generator=generator).expand(-1, k, -1, -1, -1).flatten(0, 1)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).repeat_interleave(k)
    x0, noise, timesteps = x0.to(unet.device), noise.to(unet.device), timesteps.to(unet.device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, timesteps)
    hidden = conditioning.repeat_interleave(k, dim=0)
    policy = denoising_errors(unet(noisy, timesteps, hidden).sample, target).view(b, k)
    with torch.no_grad():
        if reference_unet is not None:
            reference = denoising_errors(reference_unet(noisy, timesteps, hidden).sample, target).view(b, k)
        else:
            unet.disable_adapters()
            try:
                reference = denoising_errors(unet(noisy, timesteps, hidden).sample, target).view(b, k)
            finally:
                unet.enable_adapters()
    return preference_loss(objective, policy, reference, beta)


# ---------------------------------------------------------------- grids and curves

def brief_grid(pipeline, briefs: list[Brief], path: Path) -> Path:
    """The first six briefs' prompts, four seeds each (the generator's sample grid)."""
    from genshop.training.generator import sample_grid

    first = briefs[0]
    return sample_grid(pipeline, first.width, first.height, path, [build_prompt(b) for b in briefs[:6]],
                       steps=first.steps, guidance=first.guidance_scale)


def plot_tune_curves(log: Path, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log) if "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, key, title in ((axes[0], "loss", "preference loss"), (axes[1], "implicit_accuracy", "implicit accuracy")):
        steps = [r["step"] for r in records]
        values = [r[key] for r in records]
        window = max(1, len(values) // 30)
        ax.plot(steps, values, alpha=0.3)
        if len(values) >= window:
            ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"))
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the run

def tune(config: TuneConfig, progress: ProgressCallback | None = None) -> Path:
    """Run (or resume) the tuning; returns the adapter folder (diffusers LoRA format)."""
    from diffusers import DDPMScheduler

    from genshop.pipelines import load_pipeline
    from genshop.presets import load_preset
    from genshop.settings import get_settings
    from reward.scoring import load_scorer

    if config.threads:
        torch.set_num_threads(config.threads)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    preset = load_preset(config.preset or get_settings().preset)
    briefs = load_tune_briefs(config.briefs, preset, config.seed, steps=config.inference_steps,
                              guidance_scale=config.guidance_scale)
    loaded = load_pipeline(preset)
    pipeline = loaded.pipeline
    unet = pipeline.unet
    unet.requires_grad_(False)
    torch.manual_seed(config.seed)
    parameters = add_group_adapter(unet, config.group, config.rank)
    for parameter in parameters:
        parameter.requires_grad_(True)
    lora = torch.nn.ParameterList(parameters)  # the trainable part, as one module for checkpoints
    optimizer = torch.optim.AdamW(lora.parameters(), lr=config.learning_rate, weight_decay=0.0)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    state_dir, log = out / "state", out / "log.jsonl"
    step = load_training_state(state_dir, lora, optimizer)["step"] if has_training_state(state_dir) else 0
    truncate_log(log, step)
    total = config.rounds * config.steps_per_round
    if not (out / "samples-before.png").is_file():
        unet.disable_adapters()
        brief_grid(pipeline, briefs, out / "samples-before.png")
        unet.enable_adapters()

    scorer = None if config.preferences else load_scorer(config.reward)
    prompt_cache: dict[str, torch.Tensor] = {}

    def conditioning(prompts: list[str]) -> torch.Tensor:
        for prompt in prompts:
            if prompt not in prompt_cache:
                with torch.no_grad():
                    prompt_cache[prompt] = pipeline.encode_prompt(prompt, pipeline.device, 1, False)[0][0]
        return torch.stack([prompt_cache[p] for p in prompts])

    while step < total:
        round_index = step // config.steps_per_round
        rankings_file = out / f"rankings-round{round_index:03d}.safetensors"
        if rankings_file.is_file():  # a resumed round trains on the rankings it sampled
            with safe_open(str(rankings_file), framework="pt") as f:
                rankings = [Ranking.model_validate(r) for r in json.loads(f.metadata()["rankings"])]
                latents = f.get_tensor("latents")
        else:
            if progress:
                progress("sample", 0, len(briefs), {"round": round_index})
            if config.preferences:
                rankings, latents = preference_rankings(pipeline, config.preferences, config.group, briefs[0].width,
                                                        briefs[0].height)
            else:
                rankings, latents = sample_rankings(pipeline, briefs, config.group, scorer, config.candidates,
                                                    config.seed + round_index)
            save_file({"latents": latents.contiguous()}, str(rankings_file),
                      metadata={"rankings": json.dumps([r.model_dump() for r in rankings])})
            append_log(log, {"event": "rankings", "round": round_index, "step": step, "rankings": len(rankings),
                             "mean_reward_best": float(np.mean([r.rewards[0] for r in rankings])),
                             "mean_reward": float(np.mean([np.mean(r.rewards) for r in rankings]))})
        generator = torch.Generator().manual_seed(config.seed * 7919 + step)
        round_end = (round_index + 1) * config.steps_per_round
        while step < round_end:
            chosen = torch.randint(len(rankings), (config.batch_size,), generator=generator)
            loss, accuracy = preference_step(unet, noise_scheduler, latents[chosen],
                                             conditioning([rankings[i].prompt for i in chosen.tolist()]),
                                             config.objective, config.beta, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
            optimizer.step()
            if math.isnan(loss.item()):
                raise FloatingPointError("the preference loss became NaN; lower the learning rate or beta")
            step += 1
            metrics = {"step": step, "round": round_index, "loss": loss.item(), "implicit_accuracy": accuracy.item()}
            append_log(log, metrics)
            if progress:
                progress("tune", step, total, metrics)
            if step % config.checkpoint_every == 0 or step == round_end:
                save_training_state(state_dir, lora, optimizer, step)

    adapter = out / "adapter"
    save_group_adapter(unet, config.group, adapter)
    (adapter / "genshop_adapter.json").write_text(json.dumps({
        "group": config.group, "objective": config.objective, "base_model": loaded.model_id,
        "base_revision": loaded.revision, "steps": step, "beta": config.beta, "rank": config.rank}, indent=2))
    brief_grid(pipeline, briefs, out / "samples-after.png")
    plot_tune_curves(log, out / "curves.png")
    return adapter
