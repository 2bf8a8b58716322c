"""``genshop tune eval``: a group's LoRA against the base model on held-out briefs, guarding
against reward hacking, beside the ceilings that say what tuning can reach. Any model
family: the adapter is loaded with the family pipeline's own ``load_lora_weights`` and the
images made as generation makes them (``family.generation_kwargs``), the same seeds for
both arms.

For every brief, ``variants`` images from the base model and from the tuned one, with the
same seeds, are compared pairwise:

- **reward win rate**: the training reward (a CLIP reward model, or an attribute reward:
  ``reward.scoring.load_image_reward``) prefers the tuned image (ties count half);
- **held-out win rate**: a judgement the tuning never saw: the simulator's hidden utility of
  the group (``configs/groups.yaml``) applied to the attributes the evaluation-only judge
  detects in each image (master category, article type, colour; sub-category from the
  taxonomy; usage and gender as the brief names them), the brief-colour bonus included;
- **fidelity**: the share of images the judge finds to match what the brief asks for (its
  article type, that type's master category, its colour), base and tuned: the tuned model
  may lose at most 2 points on any of them;
- **diversity**: the mean pairwise cosine distance of a brief's variants in the reward
  model's CLIP space: the tuned model must keep at least 90% of the base's.

**Ceilings** (``best_of``, e.g. 4, 8, 16): best-of-N sampling from the base model, judged
as the tuned arm is, against the same base images. Per brief a pool of ``pool`` base
images (seeds apart from the base arm's) is generated once, in batched calls, and shared
by every group evaluated in the run; a best-of-N pick is the top of N images by

- the **training reward** (what tuning toward this reward can reach, the baseline a tuned
  model must beat: one tuned sample must be worth more than sampling N and picking), or
- the **held-out judgement** itself (the oracle: what any generator reached by sampling
  the base model could; out of reach for a reward-guided method).

Each figure is the exact expectation over all N-subsets of the pool (a U-statistic:
sorted by the selector, the pool's ``i``-th smallest is the pick of a random N-subset with
probability ``C(i - 1, N - 1) / C(pool, N)``), so a pool of 16 to 24 gives low-variance,
unbiased best-of-N estimates for N up to the pool size. Without an adapter only the base
and the ceilings are measured (``genshop tune eval --group A --group B ...`` before any
tuning: the base images, pool, judge readings and rewards are shared by the groups).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from genshop.settings import BUNDLE_DIR, REPO_ROOT

ProgressCallback = Callable[[int, int], None]
TARGETS = {"heldout_win_rate": 0.70, "fidelity_drop_points": 2.0, "diversity_ratio": 0.90}
BASELINE_BEST_OF = 4  # the tuned model must match best-of-4 by the training reward


class TuneEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: str
    adapter: Path | None = Field(default=None, description="the group's LoRA folder (diffusers format); "
                                 "none: the base and the ceilings only")
    briefs: Path = Field(description="held-out briefs (YAML list)")
    reward: Path = Field(description="the training reward: a CLIP reward model folder or an attribute reward folder")
    judge: Path = BUNDLE_DIR / "judge"
    groups: Path = REPO_ROOT / "configs" / "groups.yaml"
    taxonomy: Path = REPO_ROOT / "configs" / "understanding" / "taxonomy.yaml"
    preset: str | None = None
    variants: int = Field(default=4, ge=2)
    best_of: list[int] = Field(default_factory=lambda: [4, 8, 16],
                               description="N of the best-of-N ceilings (by reward and by the oracle); [] for none")
    pool: int | None = Field(default=None, ge=2, description="base images per brief for the ceilings "
                             "(default: the largest N)")
    batch_size: int = Field(default=16, ge=1, description="images per pipeline call for the pool")
    inference_steps: int | None = None
    seed: int = 0
    grid: Path | None = None


class Ceiling(BaseModel):
    """Best-of-N from the base model: the pick's expected figures against the base images."""

    n: int
    selector: str = Field(description="'reward' (the training reward) or 'oracle' (the held-out judgement)")
    heldout_win_rate: float
    reward_win_rate: float
    mean_utility: float = Field(description="the pick's mean held-out utility")
    fidelity: dict[str, float]
    fidelity_drop_points: float


class TuneEvalReport(BaseModel):
    group: str
    briefs: int
    variants: int
    reward_win_rate: float | None = None
    heldout_win_rate: float | None = None
    mean_utility_base: float
    mean_utility_tuned: float | None = None
    fidelity_base: dict[str, float]
    fidelity_tuned: dict[str, float] | None = None
    fidelity_drop_points: float | None = Field(default=None,
                                               description="the largest drop over the judged columns, in points")
    diversity_base: float
    diversity_tuned: float | None = None
    diversity_ratio: float | None = None
    pool: int = 0
    ceilings: list[Ceiling] = Field(default_factory=list)
    passed: dict[str, bool] = Field(default_factory=dict)

    def ceiling(self, n: int, selector: str) -> Ceiling | None:
        return next((c for c in self.ceilings if c.n == n and c.selector == selector), None)


def win_rate(tuned: np.ndarray, base: np.ndarray) -> float:
    return float(np.mean((tuned > base) + 0.5 * (tuned == base)))


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    pairs = list(itertools.combinations(range(len(embeddings)), 2))
    # a distance is never negative: rounding makes 1 - cos of near-identical unit vectors -1e-7 or so
    return float(np.mean([max(0.0, 1.0 - float(embeddings[i] @ embeddings[j])) for i, j in pairs]))


def best_of_n_weights(keys: np.ndarray, n: int) -> np.ndarray:
    """``[P]`` probabilities that each pool item is the top (by ``keys``) of a uniformly random
    ``n``-subset of the pool: ``C(i - 1, n - 1) / C(P, n)`` for the ``i``-th smallest (ties
    broken by position, which leaves the pick's key, and so any figure of the key, exact)."""
    p = len(keys)
    if not 1 <= n <= p:
        raise ValueError(f"best-of-{n} needs a pool of at least {n} (got {p})")
    order = np.lexsort((np.arange(p), keys))  # ascending by key, then by position
    weights = np.zeros(p)
    weights[order] = [math.comb(i, n - 1) / math.comb(p, n) for i in range(p)]
    return weights


def _judged_frame(judge, images, brief, parents):
    from genshop.evaluation.judge import judge_images, to_pixels
    from reward.simulator import ATTRIBUTES

    judged, _ = judge_images(judge, to_pixels(images, judge.config.width, judge.config.height))
    frame = pd.DataFrame({"master_category": judged["master_category"], "article_type": judged["article_type"],
                          "colour": judged["colour"]})
    frame["sub_category"] = [parents.get(a, ("", ""))[1] for a in frame["article_type"]]
    frame["usage"], frame["gender"] = brief.usage or "", brief.gender or ""
    for column in ATTRIBUTES:
        frame[column] = frame.get(column, "")
    return frame


def evaluate_tuning(config: TuneEvalConfig, progress: ProgressCallback | None = None) -> TuneEvalReport:
    """The report of ``config.group``."""
    return evaluate_groups(config, [config.group], progress)[0]


def evaluate_groups(config: TuneEvalConfig, groups: list[str], progress: ProgressCallback | None = None
                    ) -> list[TuneEvalReport]:
    """One report per group; the base images, pool and judge readings are shared. An adapter
    (``config.adapter``) is the tuned arm of a single group."""
    from genshop.adapters import adapter_name, use_group
    from genshop.evaluation.judge import JudgeModel
    from genshop.generation import build_prompt
    from genshop.pipelines import load_pipeline
    from genshop.presets import load_preset
    from genshop.settings import get_settings
    from genshop.tuning.tune import load_tune_briefs
    from genshop.understanding.taxonomy import load_taxonomy
    from reward.scoring import load_image_reward
    from reward.simulator import item_utilities, load_simulator_spec

    if config.adapter is not None and len(groups) != 1:
        raise ValueError("an adapter is evaluated for one group")
    best_of = sorted(set(config.best_of))
    pool_size = (config.pool or max(best_of)) if best_of else 0
    if best_of and pool_size < max(best_of):
        raise ValueError(f"a pool of {pool_size} images cannot give best-of-{max(best_of)}")
    preset = load_preset(config.preset or get_settings().preset)
    briefs = load_tune_briefs(config.briefs, preset, config.seed, steps=config.inference_steps,
                              variants=config.variants)
    loaded = load_pipeline(preset, adapters=False)
    pipeline, family = loaded.pipeline, loaded.family
    arms = ["base"]
    adapters = {}
    if config.adapter is not None:
        adapters = {"eval": config.adapter}
        pipeline.load_lora_weights(str(config.adapter), adapter_name=adapter_name("eval"))
        arms.append("tuned")
    reward = load_image_reward(config.reward)  # a CLIP reward model or an attribute reward
    unknown = [g for g in groups if reward.groups is not None and g not in reward.groups]
    if unknown:
        raise ValueError(f"the attribute reward {config.reward} knows no group(s) {unknown}; it has {list(reward.groups)}")
    judge = JudgeModel.from_pretrained(config.judge)
    spec = load_simulator_spec(config.groups)
    for group in groups:
        if group not in spec.groups:
            raise ValueError(f"group {group!r} has no simulated taste in {config.groups}")
    rows = [list(spec.groups).index(g) for g in groups]
    parents = {a.name: (a.master_category, a.sub_category) for a in load_taxonomy(config.taxonomy).article_types}

    def generate(prompt, brief, seeds):
        kwargs = family.generation_kwargs(pipeline, prompt, brief.negative_prompt or "", len(seeds),
                                          brief.guidance_scale, preset.defaults.max_sequence_length)
        with torch.inference_mode():
            return pipeline(**kwargs, num_inference_steps=brief.steps, width=brief.width, height=brief.height,
                            generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    def read(images, brief, prompt, asked):
        """Per group ``[n]`` rewards and utilities, and the fidelity matches of the images."""
        scores = reward.score(images, prompt, brief, groups)
        frame = _judged_frame(judge, images, brief, parents)
        utility = item_utilities(spec, frame)[rows]
        if brief.colour:
            utility = utility + spec.brief_colour_bonus * (frame["colour"].str.lower() == brief.colour.lower()
                                                           ).to_numpy()
        matches = [{column: frame[column].iloc[i] == wanted for column, wanted in asked.items() if wanted}
                   for i in range(len(images))]
        return np.array([scores[g] for g in groups]), utility, matches

    # per arm: [groups, briefs, variants] rewards and utilities; matches per image
    rewards = {arm: [] for arm in arms}
    utilities = {arm: [] for arm in arms}
    matches = {arm: [] for arm in arms}
    diversity = {arm: [] for arm in arms}
    pool = {"rewards": [], "utilities": [], "matches": []}  # [groups, briefs, pool]
    grid_rows = []
    for done, brief in enumerate(briefs, start=1):
        prompt = build_prompt(brief)
        asked = {"article_type": brief.article_type, "colour": brief.colour,
                 "master_category": parents.get(brief.article_type, (None, None))[0] if brief.article_type else None}
        for arm in arms:
            use_group(pipeline, "eval" if arm == "tuned" else None, adapters)
            images = generate(prompt, brief, [brief.seed + v for v in range(brief.variants)])
            grid_rows.append((f"{arm}: {brief.title}", images))
            r, u, m = read(images, brief, prompt, asked)
            rewards[arm].append(r)
            utilities[arm].append(u)
            matches[arm] += m
            vectors = reward.embedder.embed_images(images)
            diversity[arm].append(mean_pairwise_distance(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)))
        if pool_size:
            use_group(pipeline, None, adapters)
            seeds = [brief.seed + 1_000_003 * (c + 1) for c in range(pool_size)]  # apart from the base arm's
            images = [image for start in range(0, pool_size, config.batch_size)
                      for image in generate(prompt, brief, seeds[start:start + config.batch_size])]
            r, u, m = read(images, brief, prompt, asked)
            pool["rewards"].append(r)
            pool["utilities"].append(u)
            pool["matches"].append(m)
        if progress:
            progress(done, len(briefs))
    use_group(pipeline, None, adapters)
    if config.grid:
        from genshop.contact_sheet import save_contact_sheet

        save_contact_sheet(grid_rows, config.grid)

    def fidelity(found: list[dict]) -> dict[str, float]:
        columns = sorted({c for m in found for c in m})
        return {c: float(np.mean([m[c] for m in found if c in m])) for c in columns}

    def drop(base: dict[str, float], other: dict[str, float]) -> float:
        return max([100 * (base[c] - other[c]) for c in base] or [0.0])

    fidelity_base = fidelity(matches["base"])
    diversity_base = float(np.mean(diversity["base"]))
    reports = []
    for g, group in enumerate(groups):
        base_r = np.stack([r[g] for r in rewards["base"]])  # [briefs, variants]
        base_u = np.stack([u[g] for u in utilities["base"]])
        report = TuneEvalReport(group=group, briefs=len(briefs), variants=config.variants,
                                mean_utility_base=float(base_u.mean()), fidelity_base=fidelity_base,
                                diversity_base=diversity_base, pool=pool_size)
        if "tuned" in arms:
            tuned_r = np.stack([r[g] for r in rewards["tuned"]])
            tuned_u = np.stack([u[g] for u in utilities["tuned"]])
            fidelity_tuned = fidelity(matches["tuned"])
            diversity_tuned = float(np.mean(diversity["tuned"]))
            report.reward_win_rate = win_rate(tuned_r, base_r)
            report.heldout_win_rate = win_rate(tuned_u, base_u)
            report.mean_utility_tuned = float(tuned_u.mean())
            report.fidelity_tuned = fidelity_tuned
            report.fidelity_drop_points = drop(fidelity_base, fidelity_tuned)
            report.diversity_tuned = diversity_tuned
            report.diversity_ratio = diversity_tuned / diversity_base if diversity_base > 0 else 1.0
        for n in best_of:
            for selector in ("reward", "oracle"):
                wins_u, wins_r, utility, found = [], [], [], []
                for b in range(len(briefs)):
                    pool_r, pool_u = pool["rewards"][b][g], pool["utilities"][b][g]
                    weights = best_of_n_weights(pool_r if selector == "reward" else pool_u, n)
                    # the pick against each base variant, in expectation over the pool's n-subsets
                    wins_u.append(weights @ np.array([win_rate(np.full(len(base_u[b]), x), base_u[b]) for x in pool_u]))
                    wins_r.append(weights @ np.array([win_rate(np.full(len(base_r[b]), x), base_r[b]) for x in pool_r]))
                    utility.append(weights @ pool_u)
                    found.append({c: float(weights @ np.array([m[c] for m in pool["matches"][b]]))
                                  for c in pool["matches"][b][0]})
                ceiling_fidelity = {c: float(np.mean([f[c] for f in found if c in f])) for c in fidelity_base}
                report.ceilings.append(Ceiling(
                    n=n, selector=selector, heldout_win_rate=float(np.mean(wins_u)),
                    reward_win_rate=float(np.mean(wins_r)), mean_utility=float(np.mean(utility)),
                    fidelity=ceiling_fidelity, fidelity_drop_points=drop(fidelity_base, ceiling_fidelity)))
        if "tuned" in arms:
            report.passed = {"heldout_win_rate": report.heldout_win_rate >= TARGETS["heldout_win_rate"],
                             "fidelity": report.fidelity_drop_points <= TARGETS["fidelity_drop_points"],
                             "diversity": report.diversity_ratio >= TARGETS["diversity_ratio"]}
            baseline = report.ceiling(BASELINE_BEST_OF, "reward")
            if baseline is not None:
                report.passed[f"beats_best_of_{BASELINE_BEST_OF}"] = report.heldout_win_rate >= baseline.heldout_win_rate
        reports.append(report)
    return reports
