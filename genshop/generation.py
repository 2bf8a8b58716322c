"""Brief → prompt → batched pipeline calls → images with their seeds.

Variants are denoised in fixed batches (``plan_batches``), each variant with its own
``torch.Generator`` seeded ``brief.seed + variant``, so a variant's image depends only
on the brief, its index and the model: a resumed brief regenerates exactly the images
it would have made. A brief's target groups take turns over its variants; a group with
a LoRA gets its variants from the base pipeline with that adapter switched in. Knows nothing of Celery or the database.

Best-of-N (``brief.best_of`` = N > 1): each variant is drawn from N candidates made in the
same batched pipeline call as the other variants' (candidate 0 has the variant's usual
seed, so N = 1 is today's image), scored by the reward model for the variant's target
group, and the top one kept; the kept image records its rank among the candidates, the
candidates' seeds and every candidate's score (``GeneratedImage.best_of``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from genshop.briefs import MAX_SEED, Brief
from genshop.pipelines import LoadedPipeline


class GenerationCancelled(Exception):
    """Raised when ``should_stop`` turned true during denoising."""


@dataclass
class GeneratedImage:
    variant: int
    seed: int
    image: Image.Image
    prompt: str
    negative_prompt: str
    timings: dict[str, float]
    best_of: dict | None = None  # {"n", "group", "kept", "rank", "seeds", "scores"} when made by best-of-N


StepCallback = Callable[[int, int], None]  # (step finished, total steps)


def build_prompt(brief: Brief) -> str:
    """Listing-style prompt: title, then the attribute phrases not already in it."""
    parts = [brief.title]
    lowered = brief.title.lower()
    for value in (brief.gender, brief.colour, brief.article_type, brief.usage):
        if value and value.lower() not in lowered:
            parts.append(value)
    if brief.description:
        parts.append(brief.description)
    return ", ".join(parts)


def variant_seed(brief_seed: int, variant: int) -> int:
    return (brief_seed + variant) % (MAX_SEED + 1)


def candidate_seed(brief_seed: int, variant: int, candidate: int) -> int:
    """Candidate ``c`` of a variant under best-of-N: candidate 0 is the variant's own seed."""
    return (brief_seed + variant + 1_000_003 * candidate) % (MAX_SEED + 1)


Scorer = Callable[[list[Image.Image], str, Brief, "str | None"], list[float]]  # (images, prompt, brief, group) -> rewards


def variant_group(brief: Brief, variant: int) -> str | None:
    """The target group a variant is made for: the brief's groups take turns (none: no group)."""
    return brief.groups[variant % len(brief.groups)] if brief.groups else None


def plan_batches(brief: Brief, batch_size: int, tuned_groups=frozenset()) -> list[tuple[str | None, list[int]]]:
    """Batches of variants, each with the group whose LoRA makes it (None: the base model).

    Without tuned groups this is simply consecutive variants in batches of ``batch_size``;
    with them, variants are batched per adapter so one pipeline call uses one adapter. Under
    best-of-N a call makes N candidates per variant: ``batch_size`` bounds the candidates
    (at least one variant per call)."""
    batch_size = max(1, batch_size // brief.best_of)
    by_adapter: dict[str | None, list[int]] = {}
    for variant in range(brief.variants):
        group = variant_group(brief, variant)
        by_adapter.setdefault(group if group in tuned_groups else None, []).append(variant)
    return [(adapter, variants[start:start + batch_size])
            for adapter, variants in by_adapter.items() for start in range(0, len(variants), batch_size)]


def generate_batch(
    loaded: LoadedPipeline,
    brief: Brief,
    variants: list[int],
    should_stop: Callable[[], bool] = lambda: False,
    on_step: StepCallback | None = None,
    scorer: Scorer | None = None,
) -> list[GeneratedImage]:
    """Generate the given variants of a resolved brief in one pipeline call, for any model family:
    what differs between families (negative prompt, guidance, T5 length) comes from
    ``loaded.family.generation_kwargs``. Under best-of-N (``brief.best_of`` > 1) the call
    makes every variant's candidates and ``scorer`` picks each variant's kept one."""
    prompt = build_prompt(brief)
    negative = brief.negative_prompt or ""
    n = brief.best_of
    if n > 1 and scorer is None:
        raise ValueError(f"a best-of-{n} brief needs a reward model to pick its candidates")
    seeds = [candidate_seed(brief.seed, v, c) for v in variants for c in range(n)]
    started = time.perf_counter()
    images = _denoise(loaded, prompt, negative, seeds, brief, should_stop, on_step)
    generated_s = time.perf_counter() - started
    if n == 1:
        per_image = generated_s / len(variants)
        return [
            GeneratedImage(variant=v, seed=s, image=img, prompt=prompt, negative_prompt=negative,
                           timings={"generate_s": round(per_image, 6), "batch_size": float(len(variants))})
            for v, s, img in zip(variants, seeds, images)
        ]
    kept = []
    for i, v in enumerate(variants):
        candidates, candidate_seeds = images[i * n:(i + 1) * n], seeds[i * n:(i + 1) * n]
        group = variant_group(brief, v)
        scoring = time.perf_counter()
        scores = [float(x) for x in scorer(candidates, prompt, brief, group)]
        scored_s = time.perf_counter() - scoring
        order = sorted(range(n), key=lambda c: (-scores[c], c))  # best first; ties to the lower candidate
        top = order[0]
        kept.append(GeneratedImage(
            variant=v, seed=candidate_seeds[top], image=candidates[top], prompt=prompt, negative_prompt=negative,
            timings={"generate_s": round(generated_s / len(variants), 6), "score_s": round(scored_s, 6),
                     "batch_size": float(len(seeds)), "candidates": float(n)},
            best_of={"n": n, "group": group, "kept": top, "rank": 1, "seeds": candidate_seeds, "scores": scores,
                     "ranks": [order.index(c) + 1 for c in range(n)]}))
    return kept


def _denoise(loaded: LoadedPipeline, prompt: str | list[str], negative: str, seeds: list[int], settings: Brief,
             should_stop: Callable[[], bool], on_step: StepCallback | None) -> list[Image.Image]:
    """One pipeline call: an image per seed, each from its own ``torch.Generator`` (so an image
    does not depend on the batch it is in), with ``settings``' steps, guidance and size."""
    pipe = loaded.pipeline
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    stopped = False

    def step_end(pipeline, step, _timestep, callback_kwargs):
        nonlocal stopped
        if on_step:
            on_step(step + 1, settings.steps)
        if should_stop():
            stopped = True
            pipeline._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    family_kwargs = loaded.family.generation_kwargs(pipe, prompt, negative, len(seeds), settings.guidance_scale,
                                                    loaded.preset.defaults.max_sequence_length)
    with torch.inference_mode():
        output = pipe(**family_kwargs, num_inference_steps=settings.steps, width=settings.width,
                      height=settings.height, generator=generators, callback_on_step_end=step_end)
    if stopped:
        raise GenerationCancelled()
    return output.images


def shared_call_key(brief: Brief, adapter: str | None) -> tuple:
    """What variants of different briefs must share to be denoised in one pipeline call: the
    adapter, steps, guidance, size and negative prompt (the model is the worker's one). Best-of-N
    briefs keep their own calls (their candidates are scored per variant)."""
    return (adapter, brief.steps, brief.guidance_scale, brief.width, brief.height, brief.negative_prompt or "",
            brief.best_of)


def generate_across_briefs(
    loaded: LoadedPipeline,
    work: list[tuple[Brief, int]],
    should_stop: Callable[[], bool] = lambda: False,
    on_step: StepCallback | None = None,
) -> list[GeneratedImage]:
    """Generate variants of several resolved briefs in one pipeline call: ``work`` is (brief,
    variant) pairs that share ``shared_call_key``. Each variant has its brief's prompt and
    its own seeded generator, so its image equals the one ``generate_batch`` makes for its
    brief alone (up to the float rounding of a different batch size)."""
    first = work[0][0]
    if first.best_of != 1 or any(shared_call_key(b, None) != shared_call_key(first, None) for b, _ in work):
        raise ValueError("variants denoised together must share steps, guidance, size and negative prompt")
    prompts = [build_prompt(b) for b, _ in work]
    seeds = [variant_seed(b.seed, v) for b, v in work]
    negative = first.negative_prompt or ""
    started = time.perf_counter()
    images = _denoise(loaded, prompts, negative, seeds, first, should_stop, on_step)
    per_image = (time.perf_counter() - started) / len(work)
    return [GeneratedImage(variant=v, seed=s, image=img, prompt=p, negative_prompt=negative,
                           timings={"generate_s": round(per_image, 6), "batch_size": float(len(work))})
            for (_, v), s, img, p in zip(work, seeds, images, prompts)]


def reward_scorer(model_dir) -> Scorer:
    """A best-of-N scorer from a reward folder (``reward.scoring.load_image_reward``: a CLIP reward model, or an
    attribute reward read through the settings' enrich stage): each candidate's reward for the variant's group.
    A brief without groups, or a group the reward does not know, is scored as the population: the CLIP model's
    fallback, or the mean of the attribute reward's groups."""
    from reward.groups import POPULATION
    from reward.scoring import load_image_reward

    reward = load_image_reward(model_dir)

    def score(images: list[Image.Image], prompt: str, brief: Brief, group: str | None) -> list[float]:
        if reward.groups is None:
            key = group or POPULATION
            return reward.score(images, prompt, brief, [key])[key]
        if group in reward.groups:
            return reward.score(images, prompt, brief, [group])[group]
        return np.mean(list(reward.score(images, prompt, brief, reward.groups).values()), axis=0).tolist()

    return score
