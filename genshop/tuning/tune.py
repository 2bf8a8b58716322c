"""``genshop tune``: a LoRA per customer group, trained on the group reward model's preferences.

One run tunes one group, on any model family (``genshop.families``: SD 1.x, SDXL, SD3,
FLUX). Top to bottom:

1. Load the base pipeline (a preset, like the workers), the briefs and the reward model;
   add a fresh LoRA on the family's targets (``adapters.add_group_adapter``: UNet
   attention; DiT attention and feed-forward): the only trainable weights.
2. Each round (online): for every brief, sample ``candidates`` images from the current
   policy (the pipeline with the adapter), score them for the group, and keep their
   latents ranked best first (``[C, H, W]`` latents in the VAE's scaled space; FLUX's
   packed tokens unpacked). Offline (``preferences``): impressions of the reward
   format whose items are image files (e.g. an A/B import) give, per impression, the
   chosen image against each other one shown; their latents come from the VAE.
3. Train on the rankings: the same noise and timestep for the candidates of a ranking,
   the family's forward process (DDPM ε/v for SD 1.x and SDXL, flow matching with
   velocity targets and logit-normal timesteps for SD3 and FLUX: ``noise``), denoising
   errors of the policy and of the reference (the same network with adapters disabled: no
   second copy in memory), and the chosen objective (``losses``: Diffusion-DPO, its
   Flow-DPO form, or Plackett–Luce), beta by default per prediction type.
4. Checkpoints (LoRA + optimizer, safetensors) every ``checkpoint_every`` steps and at
   the end of each round, with the round's rankings cached, so a killed run resumes
   where it stopped. The adapter is saved in the diffusers LoRA format of the family's
   pipeline into ``out/adapter``; loss and implicit-accuracy curves and before/after
   sample grids go to ``out`` as PNG.
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
from genshop.adapters import ADAPTER_RECORD, add_group_adapter, save_group_adapter
from genshop.families import family_of
from genshop.tuning.denoising import vae_scale_factor
from genshop.tuning.losses import default_beta, denoising_errors, preference_loss, ranking_labels

ProgressCallback = Callable[[str, int, int, dict], None]  # (stage, done, total, metrics)


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: str = Field(min_length=1)
    briefs: Path = Field(description="YAML: a list of briefs (the brief schema); their prompts are tuned on")
    reward: Path = Field(description="group reward folder: a CLIP reward model, or an attribute reward "
                         "(`genshop reward fit-attributes`)")
    out: Path
    preset: str | None = Field(default=None, description="generation preset of the base pipeline (default: settings)")
    objective: Literal["dpo", "listwise", "kto"] = "dpo"
    preferences: list[Path] = Field(default_factory=list,
                                    description="offline: impressions files (items = image files) instead of sampling")
    rankings_from: Path | None = Field(default=None, description="round 0 re-ranks the base model's candidates of "
                                       "another run (its rankings-round000.safetensors) for this group instead of "
                                       "sampling them again: the same prompts, candidates and seeds")
    min_margin: float = Field(default=0.0, ge=0, description="guard: sampled rankings whose best and worst rewards "
                              "differ by less are dropped (near-ties the reward cannot tell apart; with --on-brief, a best on "
                              "brief and a worst off it are kept: ``margin_kept``)")
    on_brief: bool = Field(default=False, description="guard: sampled candidates that ``on_brief_reader`` reads as the "
                           "brief's article type rank above those it reads as another (by reward within each), so "
                           "the preferred image never leaves the brief")
    on_brief_reader: Literal["zero-shot", "top-tuned", "both"] = Field(
        default="top-tuned", description="the on-brief guard's classifier: the enrich stage's zero-shot one, the "
        "understanding folder's top-tuned heads (on the mini model's images, the judge finds 92% of what these read "
        "as on brief on brief, against 84% for zero-shot), or both (on brief where the two agree it is)")
    validation_briefs: int = Field(default=0, ge=0, description="guard: this many of the briefs (a fixed random "
                                   "split) are not tuned on; after each round their mean reward over fixed seeds "
                                   "is measured and the adapter of the best round is the one saved")
    validation_variants: int = Field(default=4, ge=1)
    validate_every: int | None = Field(default=None, ge=1, description="validation every this many steps "
                                       "(default: at the end of each round)")
    candidates: int = Field(default=4, ge=2, description="K images sampled per brief and round")
    rounds: int = Field(default=1, ge=1)
    steps_per_round: int = Field(default=100, ge=1)
    batch_size: int = Field(default=2, ge=1, description="rankings per step")
    learning_rate: float = Field(default=1e-4, gt=0)
    beta: float | None = Field(default=None, gt=0, description="the objective's beta (default by prediction type: "
                               "5000 for ε/v, the paper's SD 1.5 value; 500 for flow matching; losses.DEFAULT_BETA)")
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
    labels: list[float] | None = None  # KTO: +1 desirable, -1 undesirable per candidate; None: by position
    on_brief: list[bool] | None = None  # the on-brief guard's reading per candidate (same order)


def margin_kept(rankings: list[Ranking], min_margin: float) -> list[int]:
    """The rankings the margin guard keeps: those whose best and worst rewards differ by at least
    ``min_margin``, and those whose best and worst the on-brief guard tells apart (on brief
    against off brief: the order is the guard's, not a near-tie of the reward's; its reward
    difference may be negative)."""
    return [i for i, r in enumerate(rankings)
            if r.rewards[0] - r.rewards[-1] >= min_margin or (r.on_brief is not None and r.on_brief[0] != r.on_brief[-1])]


def ranking_order(rewards: list[float], on_brief: list[bool] | None = None) -> np.ndarray:
    """Candidates best first: by reward, or on-brief ones first and by reward within each."""
    keys = -np.asarray(rewards, dtype=float)
    if on_brief is None:
        return np.argsort(keys, kind="stable")
    return np.lexsort((keys, ~np.asarray(on_brief, dtype=bool)))


def ranked(prompt: str, rewards: list[float], on_brief: list[bool] | None = None) -> tuple[Ranking, torch.Tensor]:
    """One prompt's candidates as a ``Ranking`` (``ranking_order``) and the order to put their latents in."""
    order = ranking_order(rewards, on_brief)
    return (Ranking(prompt=prompt, rewards=[rewards[j] for j in order],
                    on_brief=None if on_brief is None else [on_brief[j] for j in order]), torch.from_numpy(order))


def group_scorer(reward_dir: Path, group: str, enrich_config=None):
    """``score(images, prompt, brief) -> [reward per image]`` of ``group`` by the reward in ``reward_dir`` (a CLIP
    reward model, or an attribute reward read through the enrich stage of ``enrich_config``: ``load_image_reward``)."""
    from reward.scoring import load_image_reward

    reward = load_image_reward(reward_dir, enrich_config)
    return lambda images, prompt, brief: reward.score(images, prompt, brief, [group])[group]


def brief_reader(enricher, classifiers=None):
    """``read(images, article_type) -> [bool]``: every classifier (default: the enricher's own) reads
    each image as that article type; the images are embedded once, by the enricher."""
    from genshop.enrichment import understand_embeddings

    def read(images, article_type: str | None) -> list[bool] | None:
        if not article_type:  # a brief that names no article type: nothing to guard
            return None
        embeddings = enricher.embedder.embed_images(images)
        readings = [[u.article_type.label == article_type for u in understand_embeddings(enricher, embeddings, c)]
                    for c in classifiers or [enricher.classifier]]
        return [all(flags) for flags in zip(*readings)]

    return read


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
def sample_rankings(family, pipeline, briefs: list[Brief], scorer, k: int, seed: int,
                    max_sequence_length: int | None = None, read_on_brief=None) -> tuple[list[Ranking], torch.Tensor]:
    """Sample ``k`` candidates per brief from the current pipeline and rank them by the group's reward
    (``scorer``: ``group_scorer``; ``read_on_brief``: on-brief candidates first, ``ranking_order``); the latents
    ``[briefs, k, C, H, W]`` as the family trains on them (``ranking_latents``)."""
    rankings, latents = [], []
    for i, brief in enumerate(briefs):
        prompt = build_prompt(brief)
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        kwargs = family.generation_kwargs(pipeline, prompt, brief.negative_prompt or "", k, brief.guidance_scale,
                                          max_sequence_length)
        sampled = pipeline(**kwargs, num_inference_steps=brief.steps, width=brief.width, height=brief.height,
                           generator=generator, output_type="latent").images
        sampled = family.ranking_latents(pipeline, sampled, brief.height, brief.width)
        images = family.decode_latents(pipeline, sampled)
        rewards = scorer(images, prompt, brief)
        ranking, order = ranked(prompt, rewards, read_on_brief(images, brief.article_type) if read_on_brief else None)
        rankings.append(ranking)
        latents.append(sampled[order].float().cpu())
    return rankings, torch.stack(latents)


@torch.no_grad()
def preference_rankings(family, pipeline, paths: list[Path], group: str, width: int, height: int,
                        objective: str = "dpo") -> tuple[list[Ranking], torch.Tensor]:
    """Offline pairs from impressions (K = 2): the chosen image against each other one shown; where
    several impressions showed the same images (an A/B import), pairs by choice share (``click_pairs``).

    For ``kto``, single images (K = 1) instead: desirable when chosen, clicked or purchased,
    undesirable when shown and none of these (impressions where none was chosen count too)."""
    from PIL import Image

    from reward.impressions import read_impression_files

    frame = read_impression_files(paths)
    frame = frame[(frame["group_id"] == group) & (frame["chosen"].notna() | (objective == "kto"))]
    if frame.empty:
        raise ValueError(f"no impressions with a choice for group {group!r} in {', '.join(map(str, paths))}")
    cache: dict[str, torch.Tensor] = {}

    def latent(path: str) -> torch.Tensor:
        if path not in cache:
            image = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
            cache[path] = family.encode_images(pipeline, [image])[0]
        return cache[path]

    rankings, latents = [], []
    if objective == "kto":
        for row in frame.to_dict("records"):
            for i, item in enumerate(row["items"]):
                acted = any(row.get(name) is not None and not isinstance(row.get(name), float) and row[name][i] > 0
                            for name in ("clicks", "purchases"))
                desirable = item == row["chosen"] or acted
                rankings.append(Ranking(prompt=row["brief"], rewards=[float(desirable)],
                                        labels=[1.0 if desirable else -1.0]))
                latents.append(latent(item)[None])
        return rankings, torch.stack(latents)
    for (brief, _), rows in frame.groupby(["brief", frame["items"].map(lambda items: tuple(sorted(items)))],
                                          sort=False):
        if len(rows) == 1:  # one impression: its choice against each other image shown
            row = rows.iloc[0]
            pairs = [((row["chosen"], 1.0), (other, 0.0)) for other in row["items"] if other != row["chosen"]]
        else:
            pairs = click_pairs(rows)
        for (better, share_better), (worse, share_worse) in pairs:
            rankings.append(Ranking(prompt=brief, rewards=[share_better, share_worse]))
            latents.append(torch.stack([latent(better), latent(worse)]))
    return rankings, torch.stack(latents)


def click_pairs(rows) -> list[tuple[tuple[str, float], tuple[str, float]]]:
    """Impressions that showed the same images (an A/B import: one per choice, in proportion to each
    listing's CTR) as pairs of ``(image, choice share)``: the ``i``-th most chosen against the
    ``i``-th least chosen for the top quarter, the widest margins the clicks give."""
    shown = sorted(set(rows["items"].iloc[0]))
    chosen = rows["chosen"].value_counts()
    shares = {image: float(chosen.get(image, 0)) / len(rows) for image in shown}
    ranked = sorted(shown, key=lambda image: (-shares[image], image))
    return [((ranked[i], shares[ranked[i]]), (ranked[-1 - i], shares[ranked[-1 - i]]))
            for i in range(max(1, len(ranked) // 4)) if shares[ranked[i]] > shares[ranked[-1 - i]]]


@torch.no_grad()
def rerank(family, pipeline, path: Path, scorer, briefs: dict[str, Brief] | None = None,
           read_on_brief=None) -> tuple[list[Ranking], torch.Tensor]:
    """Another run's round-0 candidates (sampled from the base model, so the same for every group),
    ranked by this group's reward (``scorer``) and the on-brief guard's reading (``briefs`` by prompt)."""
    briefs = briefs or {}
    with safe_open(str(path), framework="pt") as f:
        sampled = [Ranking.model_validate(r) for r in json.loads(f.metadata()["rankings"])]
        all_latents = f.get_tensor("latents")
    rankings, latents = [], []
    for ranking, candidates in zip(sampled, all_latents):
        images = family.decode_latents(pipeline, candidates)
        brief = briefs.get(ranking.prompt)
        rewards = scorer(images, ranking.prompt, brief)
        on_brief = read_on_brief(images, brief.article_type if brief else None) if read_on_brief else None
        reranked, order = ranked(ranking.prompt, rewards, on_brief)
        rankings.append(reranked)
        latents.append(candidates[order])
    return rankings, torch.stack(latents)


def split_validation(briefs: list[Brief], n: int, seed: int) -> tuple[list[Brief], list[Brief]]:
    """``n`` briefs (a fixed random choice) held out of the tuning for early stopping, and the rest."""
    if n == 0:
        return briefs, []
    if n >= len(briefs):
        raise ValueError(f"{n} validation briefs leave none of the {len(briefs)} to tune on")
    chosen = set(random.Random(seed + 1).sample(range(len(briefs)), n))
    return [b for i, b in enumerate(briefs) if i not in chosen], [b for i, b in enumerate(briefs) if i in chosen]


@torch.no_grad()
def validation_reward(family, pipeline, briefs: list[Brief], scorer, variants: int,
                      max_sequence_length: int | None = None) -> float:
    """The group's mean reward of the current policy's images on the validation briefs, fixed seeds."""
    values = []
    for i, brief in enumerate(briefs):
        prompt = build_prompt(brief)
        kwargs = family.generation_kwargs(pipeline, prompt, brief.negative_prompt or "", variants,
                                          brief.guidance_scale, max_sequence_length)
        images = pipeline(**kwargs, num_inference_steps=brief.steps, width=brief.width, height=brief.height,
                          generator=[torch.Generator().manual_seed(7_000_003 + 101 * i + v) for v in range(variants)]
                          ).images
        values += scorer(images, prompt, brief)
    return float(np.mean(values))


# ---------------------------------------------------------------- one step

def preference_step(family, denoiser, process, latents: torch.Tensor, conditioning: dict[str, torch.Tensor],
                    objective: str, beta: float, generator: torch.Generator, reference=None,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and implicit accuracy on ``[B, K, C, H, W]`` ranked latents with one conditioning row per ranking.

    ``family`` makes the network call (``prediction``) and ``process`` (its
    ``noise_process``) the noised input and target: ε/v-prediction or flow matching. The
    same noise and timestep go to the ``K`` candidates of a ranking. The reference is
    ``denoiser`` with its adapters disabled, or ``reference`` when given (the original
    Diffusion-DPO structure, a frozen copy, which ``bench/dpo.py`` compares against)."""
    b, k = latents.shape[:2]
    parameter = next(denoiser.parameters())
    device, dtype = parameter.device, parameter.dtype
    x0 = latents.flatten(0, 1).float()
    noise = torch.randn((b, 1, *latents.shape[2:]), generator=generator).expand(-1, k, *latents.shape[2:]).flatten(0, 1)
    timesteps = process.sample_timesteps(b, generator).repeat_interleave(k)
    noisy, target = process.noisy_and_target(x0, noise, timesteps)
    noisy, target, timesteps = noisy.to(device, dtype), target.to(device), timesteps.to(device)
    repeated = {name: value.to(device, dtype if value.is_floating_point() else value.dtype).repeat_interleave(k, dim=0)
                for name, value in conditioning.items()}

    def errors(network) -> torch.Tensor:
        return denoising_errors(family.prediction(network, noisy, timesteps, repeated), target).view(b, k)

    policy = errors(denoiser)
    with torch.no_grad():
        if reference is not None:
            reference_errors = errors(reference)
        else:
            denoiser.disable_adapters()
            try:
                reference_errors = errors(denoiser)
            finally:
                denoiser.enable_adapters()
    return preference_loss(objective, policy, reference_errors, beta, labels)


# ---------------------------------------------------------------- grids and curves

def brief_grid(family, pipeline, briefs: list[Brief], path: Path, max_sequence_length: int | None = None) -> Path:
    """The first six briefs' prompts, four seeds each, called as generation calls the family's pipeline."""
    from genshop.contact_sheet import save_contact_sheet

    rows = []
    for brief in briefs[:6]:
        prompt = build_prompt(brief)
        kwargs = family.generation_kwargs(pipeline, prompt, brief.negative_prompt or "", 4, brief.guidance_scale,
                                          max_sequence_length)
        with torch.inference_mode():
            images = pipeline(**kwargs, num_inference_steps=brief.steps, width=brief.width, height=brief.height,
                              generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
        rows.append((prompt, images))
    return save_contact_sheet(rows, path)


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
    from genshop.pipelines import load_pipeline
    from genshop.presets import load_preset
    from genshop.settings import get_settings
    from reward.attribute_reward import AttributeReward, is_attribute_reward

    enrich_config = None
    # the readers (the guard's, an attribute reward's), checked before anything is written
    attribute_reward = None
    if not config.preferences and is_attribute_reward(config.reward):
        attribute_reward = AttributeReward.from_pretrained(config.reward)
        if config.group not in attribute_reward.config.groups:
            raise ValueError(f"the attribute reward {config.reward} knows no group {config.group!r}; it has "
                             f"{', '.join(attribute_reward.config.groups)}")
    readers = {} if config.preferences else {
        **({"--on-brief-reader": config.on_brief_reader} if config.on_brief else {}),
        **({"the attribute reward's reader": attribute_reward.config.reader} if attribute_reward else {})}
    if readers:
        from genshop.enrichment import enrich_config_from_settings

        enrich_config = enrich_config_from_settings(get_settings())
        for what, reader in readers.items():
            if reader in ("top-tuned", "both") and enrich_config.understanding is None:
                raise ValueError(f"{what} {reader} needs the understanding folder's heads (GENSHOP_UNDERSTANDING "
                                 "is 'off'): pass --on-brief-reader zero-shot, or fit them with `genshop understand fit`")
    if config.threads:
        torch.set_num_threads(config.threads)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    preset = load_preset(config.preset or get_settings().preset)
    briefs = load_tune_briefs(config.briefs, preset, config.seed, steps=config.inference_steps,
                              guidance_scale=config.guidance_scale)
    briefs, validation = split_validation(briefs, config.validation_briefs, config.seed)
    loaded = load_pipeline(preset, adapters=False)  # a group's LoRA is tuned from the base model
    pipeline = loaded.pipeline
    family = family_of(pipeline)
    denoiser = family.denoiser(pipeline)
    denoiser.requires_grad_(False)
    torch.manual_seed(config.seed)
    parameters = add_group_adapter(denoiser, config.group, config.rank, targets=family.lora_targets)
    for parameter in parameters:
        parameter.requires_grad_(True)
    if denoiser.dtype != torch.float32:  # fp16/bf16 weights: the LoRA trains in fp32, as diffusers' trainers do
        from diffusers.training_utils import cast_training_params

        cast_training_params(denoiser, dtype=torch.float32)
    lora = torch.nn.ParameterList(parameters)  # the trainable part, as one module for checkpoints
    optimizer = torch.optim.AdamW(lora.parameters(), lr=config.learning_rate, weight_decay=0.0)
    process = family.noise_process(pipeline)
    text_length = preset.defaults.max_sequence_length
    beta = config.beta or default_beta(process.prediction_type)
    state_dir, log = out / "state", out / "log.jsonl"
    step = load_training_state(state_dir, lora, optimizer)["step"] if has_training_state(state_dir) else 0
    truncate_log(log, step)
    total = config.rounds * config.steps_per_round
    if not (out / "samples-before.png").is_file():
        denoiser.disable_adapters()
        brief_grid(family, pipeline, briefs, out / "samples-before.png", text_length)
        denoiser.enable_adapters()

    scorer = None if config.preferences else group_scorer(config.reward, config.group, enrich_config)
    read_on_brief = None
    if config.on_brief and enrich_config is not None:
        from genshop.enrichment import load_classifier, load_enricher

        names = ["zero-shot", "top-tuned"] if config.on_brief_reader == "both" else [config.on_brief_reader]
        enricher = load_enricher(enrich_config.model_copy(update={"classifier": names[0]}))
        read_on_brief = brief_reader(enricher, [load_classifier(enrich_config.model_copy(update={"classifier": name}),
                                                                enricher.embedder, enricher.taxonomy) for name in names])
    prompt_cache: dict[tuple[str, tuple[int, int]], dict[str, torch.Tensor]] = {}
    scale = vae_scale_factor(pipeline)

    def conditioning(prompts: list[str], latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's conditioning rows of the prompts, cached (at the image size of the latents)."""
        size = (latents.shape[-2] * scale, latents.shape[-1] * scale)
        for prompt in prompts:
            if (prompt, size) not in prompt_cache:
                with torch.no_grad():
                    encoded = family.encode_prompts(pipeline, [prompt], size, text_length)
                prompt_cache[prompt, size] = {name: value[0].detach() for name, value in encoded.items()}
        rows = [prompt_cache[p, size] for p in prompts]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

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
            if config.rankings_from is not None and round_index == 0:
                rankings, latents = rerank(family, pipeline, config.rankings_from, scorer,
                                           {build_prompt(b): b for b in briefs}, read_on_brief)
            elif config.preferences:
                rankings, latents = preference_rankings(family, pipeline, config.preferences, config.group, briefs[0].width,
                                                        briefs[0].height, config.objective)
            else:
                rankings, latents = sample_rankings(family, pipeline, briefs, scorer, config.candidates,
                                                    config.seed + round_index, text_length, read_on_brief)
            save_file({"latents": latents.contiguous()}, str(rankings_file),
                      metadata={"rankings": json.dumps([r.model_dump() for r in rankings])})
            append_log(log, {"event": "rankings", "round": round_index, "step": step, "rankings": len(rankings),
                             **({"on_brief_share": float(np.mean([x for r in rankings for x in r.on_brief]))}
                                if rankings and rankings[0].on_brief is not None else {}),
                             "mean_reward_best": float(np.mean([r.rewards[0] for r in rankings])),
                             "mean_reward": float(np.mean([np.mean(r.rewards) for r in rankings]))})
        if validation:  # rankings sampled by a run without this split (shared round files) leave its briefs out
            held_out = {build_prompt(b) for b in validation}
            keep = [i for i, r in enumerate(rankings) if r.prompt not in held_out]
            rankings, latents = [rankings[i] for i in keep], latents[torch.tensor(keep)]
        if config.min_margin > 0 and not config.preferences:  # the file keeps them all; the filter is the config's
            keep = margin_kept(rankings, config.min_margin)
            if not keep:
                raise ValueError(f"no ranking has a reward margin of {config.min_margin}: lower --min-margin")
            if not any(r.get("event") == "margin_filter" and r["round"] == round_index for r in read_log(log)):
                append_log(log, {"event": "margin_filter", "round": round_index, "step": step, "kept": len(keep),
                                 "of": len(rankings)})
            rankings, latents = [rankings[i] for i in keep], latents[torch.tensor(keep)]
        if config.objective in ("dpo", "kto") and latents.shape[1] > 2:
            # only the best and the worst are trained on: the middle candidates cost network calls for nothing
            rankings = [r.model_copy(update={"rewards": [r.rewards[0], r.rewards[-1]],
                                             "on_brief": r.on_brief and [r.on_brief[0], r.on_brief[-1]]})
                        if r.labels is None else r for r in rankings]
            latents = latents[:, [0, latents.shape[1] - 1]]
        generator = torch.Generator().manual_seed(config.seed * 7919 + step)
        round_end = (round_index + 1) * config.steps_per_round
        while step < round_end:
            chosen = torch.randint(len(rankings), (config.batch_size,), generator=generator)
            batch = latents[chosen]
            labels = None
            if config.objective == "kto":
                labels = torch.stack([torch.tensor(rankings[i].labels) if rankings[i].labels is not None
                                      else ranking_labels(batch.shape[1]) for i in chosen.tolist()])
            loss, accuracy = preference_step(family, denoiser, process, batch,
                                             conditioning([rankings[i].prompt for i in chosen.tolist()], batch),
                                             config.objective, beta, generator, labels=labels)
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
            validate = bool(validation) and (step == round_end or (config.validate_every is not None
                                                                   and step % config.validate_every == 0))
            if step % config.checkpoint_every == 0 or step == round_end or validate:
                save_training_state(state_dir, lora, optimizer, step)
            if validate:
                value = validation_reward(family, pipeline, validation, scorer,
                                          config.validation_variants, text_length)
                append_log(log, {"event": "validation", "round": round_index, "step": step, "mean_reward": value})
                best = max((r for r in read_log(log) if r.get("event") == "validation"),
                           key=lambda r: r["mean_reward"])
                if best["step"] == step:
                    save_group_adapter(denoiser, config.group, out / "best-adapter", family=family)
                    save_file({k: v.detach().contiguous() for k, v in lora.state_dict().items()},
                              str(out / "best-lora.safetensors"))

    adapter = out / "adapter"
    saved_steps = step
    if validation:  # early stopping: the adapter of the round the validation briefs' reward was best after
        import shutil

        records = [r for r in read_log(log) if r.get("event") == "validation"]
        best = max(records, key=lambda r: r["mean_reward"])
        if adapter.exists():
            shutil.rmtree(adapter)
        shutil.copytree(out / "best-adapter", adapter)
        saved_steps = best["step"]
        with safe_open(str(out / "best-lora.safetensors"), framework="pt") as f:  # the grids show the saved one
            lora.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    else:
        save_group_adapter(denoiser, config.group, adapter, family=family)
    (adapter / ADAPTER_RECORD).write_text(json.dumps({
        "group": config.group, "objective": config.objective, "base_model": loaded.model_id,
        "base_revision": loaded.revision, "steps": saved_steps, "trained_steps": step, "beta": beta,
        "rank": config.rank, "family": family.name, "prediction_type": process.prediction_type,
        "min_margin": config.min_margin, "validation_briefs": config.validation_briefs, "on_brief": config.on_brief,
        "reward": None if config.preferences else ("attribute" if attribute_reward else "clip"),
        **({"on_brief_reader": config.on_brief_reader} if config.on_brief else {})},
        indent=2))
    brief_grid(family, pipeline, briefs, out / "samples-after.png", text_length)
    plot_tune_curves(log, out / "curves.png")
    return adapter
