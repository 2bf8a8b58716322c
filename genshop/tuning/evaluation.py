"""``genshop tune eval``: a group's LoRA against the base model on held-out briefs, guarding
against reward hacking. Any model family: the adapter is loaded with the family pipeline's
own ``load_lora_weights`` and the images made as generation makes them
(``family.generation_kwargs``), the same seeds for both arms.

For every brief, ``variants`` images from the base model and from the tuned one, with the
same seeds, are compared pairwise:

- **reward win rate**: the training reward model prefers the tuned image (ties count half);
- **held-out win rate**: a judgement the tuning never saw: the simulator's hidden utility of
  the group (``configs/groups.yaml``) applied to the attributes the evaluation-only judge
  detects in each image (master category, article type, colour; sub-category from the
  taxonomy; usage and gender as the brief names them), the brief-colour bonus included;
- **fidelity**: the share of images the judge finds to match what the brief asks for (its
  article type, that type's master category, its colour), base and tuned: the tuned model
  may lose at most 2 points on any of them;
- **diversity**: the mean pairwise cosine distance of a brief's variants in the reward
  model's CLIP space: the tuned model must keep at least 90% of the base's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from genshop.settings import BUNDLE_DIR, REPO_ROOT

ProgressCallback = Callable[[int, int], None]
TARGETS = {"heldout_win_rate": 0.70, "fidelity_drop_points": 2.0, "diversity_ratio": 0.90}


class TuneEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: str
    adapter: Path = Field(description="the group's LoRA folder (diffusers format)")
    briefs: Path = Field(description="held-out briefs (YAML list)")
    reward: Path
    judge: Path = BUNDLE_DIR / "judge"
    groups: Path = REPO_ROOT / "configs" / "groups.yaml"
    taxonomy: Path = REPO_ROOT / "configs" / "understanding" / "taxonomy.yaml"
    preset: str | None = None
    variants: int = Field(default=4, ge=2)
    inference_steps: int | None = None
    seed: int = 0
    grid: Path | None = None


class TuneEvalReport(BaseModel):
    group: str
    briefs: int
    variants: int
    reward_win_rate: float
    heldout_win_rate: float
    fidelity_base: dict[str, float]
    fidelity_tuned: dict[str, float]
    fidelity_drop_points: float = Field(description="the largest drop over the judged columns, in points")
    diversity_base: float
    diversity_tuned: float
    diversity_ratio: float
    passed: dict[str, bool]


def win_rate(tuned: np.ndarray, base: np.ndarray) -> float:
    return float(np.mean((tuned > base) + 0.5 * (tuned == base)))


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    pairs = list(itertools.combinations(range(len(embeddings)), 2))
    return float(np.mean([1.0 - float(embeddings[i] @ embeddings[j]) for i, j in pairs]))


def evaluate_tuning(config: TuneEvalConfig, progress: ProgressCallback | None = None) -> TuneEvalReport:
    from genshop.adapters import adapter_name, use_group
    from genshop.evaluation.judge import JudgeModel, judge_images, to_pixels
    from genshop.generation import build_prompt
    from genshop.pipelines import load_pipeline
    from genshop.presets import load_preset
    from genshop.settings import get_settings
    from genshop.tuning.tune import load_tune_briefs
    from genshop.understanding.taxonomy import load_taxonomy
    from reward.scoring import load_scorer, score_images
    from reward.simulator import ATTRIBUTES, item_utilities, load_simulator_spec

    preset = load_preset(config.preset or get_settings().preset)
    briefs = load_tune_briefs(config.briefs, preset, config.seed, steps=config.inference_steps,
                              variants=config.variants)
    loaded = load_pipeline(preset)
    pipeline, family = loaded.pipeline, loaded.family
    adapters = {"eval": config.adapter}  # under its own name, beside any the workers' settings loaded
    pipeline.load_lora_weights(str(config.adapter), adapter_name=adapter_name("eval"))
    model, embedder = load_scorer(config.reward)
    judge = JudgeModel.from_pretrained(config.judge)
    spec = load_simulator_spec(config.groups)
    if config.group not in spec.groups:
        raise ValueError(f"group {config.group!r} has no simulated taste in {config.groups}")
    group_row = list(spec.groups).index(config.group)
    parents = {a.name: (a.master_category, a.sub_category) for a in load_taxonomy(config.taxonomy).article_types}

    rewards = {"base": [], "tuned": []}
    utilities = {"base": [], "tuned": []}
    matches = {"base": [], "tuned": []}
    diversity = {"base": [], "tuned": []}
    grid_rows = []
    for done, brief in enumerate(briefs, start=1):
        prompt = build_prompt(brief)
        asked = {"article_type": brief.article_type, "colour": brief.colour,
                 "master_category": parents.get(brief.article_type, (None, None))[0] if brief.article_type else None}
        for arm in ("base", "tuned"):
            use_group(pipeline, "eval" if arm == "tuned" else None, adapters)
            generators = [torch.Generator().manual_seed(brief.seed + v) for v in range(brief.variants)]
            kwargs = family.generation_kwargs(pipeline, prompt, brief.negative_prompt or "", brief.variants,
                                              brief.guidance_scale, preset.defaults.max_sequence_length)
            with torch.inference_mode():
                images = pipeline(**kwargs, num_inference_steps=brief.steps, width=brief.width, height=brief.height,
                                  generator=generators).images
            grid_rows.append((f"{arm}: {brief.title}", images))
            rewards[arm] += score_images(model, embedder, images, prompt, [config.group])[config.group].rewards
            judged, _ = judge_images(judge, to_pixels(images, judge.config.width, judge.config.height))
            frame = pd.DataFrame({"master_category": judged["master_category"], "article_type": judged["article_type"],
                                  "colour": judged["colour"]})
            frame["sub_category"] = [parents.get(a, ("", ""))[1] for a in frame["article_type"]]
            frame["usage"], frame["gender"] = brief.usage or "", brief.gender or ""
            for column in ATTRIBUTES:
                frame[column] = frame.get(column, "")
            utility = item_utilities(spec, frame)[group_row]
            if brief.colour:
                utility = utility + spec.brief_colour_bonus * (frame["colour"].str.lower() == brief.colour.lower())
            utilities[arm] += list(utility)
            matches[arm] += [{column: judged[column][i] == wanted for column, wanted in asked.items() if wanted}
                             for i in range(len(images))]
            vectors = embedder.embed_images(images)
            diversity[arm].append(mean_pairwise_distance(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)))
        if progress:
            progress(done, len(briefs))
    use_group(pipeline, None, adapters)

    def fidelity(arm: str) -> dict[str, float]:
        columns = sorted({c for m in matches[arm] for c in m})
        return {c: float(np.mean([m[c] for m in matches[arm] if c in m])) for c in columns}

    fidelity_base, fidelity_tuned = fidelity("base"), fidelity("tuned")
    drop = max([100 * (fidelity_base[c] - fidelity_tuned[c]) for c in fidelity_base] or [0.0])
    diversity_base, diversity_tuned = float(np.mean(diversity["base"])), float(np.mean(diversity["tuned"]))
    ratio = diversity_tuned / diversity_base if diversity_base > 0 else 1.0
    heldout = win_rate(np.array(utilities["tuned"]), np.array(utilities["base"]))
    if config.grid:
        from genshop.contact_sheet import save_contact_sheet

        save_contact_sheet(grid_rows, config.grid)
    return TuneEvalReport(
        group=config.group, briefs=len(briefs), variants=config.variants,
        reward_win_rate=win_rate(np.array(rewards["tuned"]), np.array(rewards["base"])), heldout_win_rate=heldout,
        fidelity_base=fidelity_base, fidelity_tuned=fidelity_tuned, fidelity_drop_points=drop,
        diversity_base=diversity_base, diversity_tuned=diversity_tuned, diversity_ratio=ratio,
        passed={"heldout_win_rate": heldout >= TARGETS["heldout_win_rate"],
                "fidelity": drop <= TARGETS["fidelity_drop_points"],
                "diversity": ratio >= TARGETS["diversity_ratio"]})
