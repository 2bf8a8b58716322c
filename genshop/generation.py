"""Brief → prompt → batched pipeline calls → images with their seeds.

Variants are denoised in fixed batches (``plan_batches``), each variant with its own
``torch.Generator`` seeded ``brief.seed + variant``, so a variant's image depends only
on the brief, its index and the model: a resumed brief regenerates exactly the images
it would have made. A brief's target groups take turns over its variants; a group with
a LoRA gets its variants from the base pipeline with that adapter switched in. Knows nothing of Celery or the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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


def variant_group(brief: Brief, variant: int) -> str | None:
    """The target group a variant is made for: the brief's groups take turns (none: no group)."""
    return brief.groups[variant % len(brief.groups)] if brief.groups else None


def plan_batches(brief: Brief, batch_size: int, tuned_groups=frozenset()) -> list[tuple[str | None, list[int]]]:
    """Batches of variants, each with the group whose LoRA makes it (None: the base model).

    Without tuned groups this is simply consecutive variants in batches of ``batch_size``;
    with them, variants are batched per adapter so one pipeline call uses one adapter."""
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
) -> list[GeneratedImage]:
    """Generate the given variants of a resolved brief in one pipeline call, for any model family:
    what differs between families (negative prompt, guidance, T5 length) comes from
    ``loaded.family.generation_kwargs``."""
    pipe = loaded.pipeline
    prompt = build_prompt(brief)
    negative = brief.negative_prompt or ""
    seeds = [variant_seed(brief.seed, v) for v in variants]
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    stopped = False

    def step_end(pipeline, step, _timestep, callback_kwargs):
        nonlocal stopped
        if on_step:
            on_step(step + 1, brief.steps)
        if should_stop():
            stopped = True
            pipeline._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    started = time.perf_counter()
    family_kwargs = loaded.family.generation_kwargs(pipe, prompt, negative, len(variants), brief.guidance_scale,
                                                    loaded.preset.defaults.max_sequence_length)
    with torch.inference_mode():
        output = pipe(
            **family_kwargs,
            num_inference_steps=brief.steps,
            width=brief.width,
            height=brief.height,
            generator=generators,
            callback_on_step_end=step_end,
        )
    if stopped:
        raise GenerationCancelled()
    per_image = (time.perf_counter() - started) / len(variants)
    return [
        GeneratedImage(variant=v, seed=s, image=img, prompt=prompt, negative_prompt=negative,
                       timings={"generate_s": round(per_image, 6), "batch_size": float(len(variants))})
        for v, s, img in zip(variants, seeds, output.images)
    ]
