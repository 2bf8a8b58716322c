"""Simulated impressions: customer groups with hidden utilities choosing among K catalog items.

For offline runs, tests and demos; real A/B logs replace it in production.

The truth lives in the ``simulator:`` section of the groups file (see ``configs/groups.yaml``):
each group's utility of an item is the sum of its weights for the item's attribute values
(``colour``, ``article_type``, ``sub_category``, ``master_category``, ``usage``, ``gender``,
and ``price_band`` when the catalog has a ``price`` column), plus interaction weights for
combinations (``when: {colour: Black, usage: Sports}``), plus a bonus shared by all groups
when the item has the colour the brief names. A multinomial logit with a temperature and a
no-choice option turns utilities into choice probabilities::

    P(item k) = exp(u_k / T) / (exp(u_none / T) + sum_j exp(u_j / T))

One impression: a pool of items (a hash of the product id, see ``reward.splits``), an anchor
item, K - 1 more items from the same pool with its sub-category and gender (relaxed when too
few), a brief naming the sub-category, the gender and, sometimes, the anchor's colour, and a
group drawn by share. Because the true probabilities are known, the Bayes-optimal accuracy
(always predicting the truly most likely item) is reported as the ceiling for every model.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genshop.catalog_data import UNKNOWN, read_catalog
from reward.groups import GroupsConfigError, load_groups, read_yaml
from reward.metrics import bayes_expected_accuracy, top_choice_credit
from reward.splits import item_pool

ATTRIBUTES = ("colour", "article_type", "sub_category", "master_category", "usage", "gender", "price_band")
PRICE_BANDS = ("low", "mid", "high")
BRIEF_TEMPLATES = ("{colour}{category}{gender}", "new {colour}{category} design{gender}",
                   "{colour}{category}{gender}, catalog photo")

ProgressCallback = Callable[[int, int], None]  # (done, total)


# ---------------------------------------------------------------- the hidden truth

class Interaction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when: dict[str, str] = Field(min_length=1, description="attribute → value; all must match")
    weight: float


class GroupTaste(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float = Field(default=1.0, gt=0, description="relative share of impressions")
    no_choice: float = Field(default=0.0, description="utility of choosing none of the items shown")
    utilities: dict[str, dict[str, float]] = Field(default_factory=dict)
    interactions: list[Interaction] = Field(default_factory=list)


class SimulatorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=1.0, gt=0)
    brief_colour_bonus: float = 0.0
    groups: dict[str, GroupTaste] = Field(min_length=1)


def load_simulator_spec(path: str | Path) -> SimulatorSpec:
    """The ``simulator:`` section of a groups file; every simulated group must be a declared group."""
    data = read_yaml(path)
    if "simulator" not in data:
        raise GroupsConfigError(f"{path}: no 'simulator' section (the hidden utilities to simulate from)")
    try:
        spec = SimulatorSpec.model_validate(data["simulator"])
    except ValidationError as exc:
        issues = "; ".join(f"simulator.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise GroupsConfigError(f"{path}: {issues}") from None
    declared = {group.id for group in load_groups(path)}
    undeclared = sorted(set(spec.groups) - declared)
    if undeclared:
        raise GroupsConfigError(f"{path}: simulator groups {undeclared} are not in the 'groups' section")
    for group_id, taste in spec.groups.items():
        unknown = sorted(set(taste.utilities) - set(ATTRIBUTES))
        unknown += sorted({a for i in taste.interactions for a in i.when} - set(ATTRIBUTES))
        if unknown:
            raise GroupsConfigError(f"{path}: simulator.groups.{group_id}: unknown attribute(s) {unknown}; "
                                    f"known: {', '.join(ATTRIBUTES)}")
    return spec


def catalog_attributes(paths: list[str | Path]) -> pd.DataFrame:
    """The catalog's text columns (no images), with ``price_band`` (tertiles) when a ``price`` column exists."""
    frame = read_catalog(paths, with_images=False)
    if all("price" in pq.read_schema(path).names for path in paths):
        prices = pd.concat([pd.read_parquet(path, columns=["price"]) for path in paths], ignore_index=True)["price"]
        frame["price_band"] = pd.qcut(prices.astype(float), 3, labels=list(PRICE_BANDS)).astype(str)
    else:
        frame["price_band"] = ""
    return frame


def item_utilities(spec: SimulatorSpec, items: pd.DataFrame) -> np.ndarray:
    """``[groups, items]`` utilities (groups in ``spec.groups`` order), without the brief bonus."""
    utilities = np.zeros((len(spec.groups), len(items)), dtype=np.float64)
    for g, taste in enumerate(spec.groups.values()):
        for attribute, weights in taste.utilities.items():
            utilities[g] += items[attribute].map(weights).fillna(0.0).to_numpy(dtype=np.float64)
        for interaction in taste.interactions:
            match = np.ones(len(items), dtype=bool)
            for attribute, value in interaction.when.items():
                match &= (items[attribute] == value).to_numpy()
            utilities[g] += interaction.weight * match
    return utilities


def choice_probabilities(utilities: np.ndarray, no_choice: np.ndarray, temperature: float) -> np.ndarray:
    """MNL probabilities ``[..., K + 1]`` (each item, then none) from utilities ``[..., K]`` and ``no_choice`` ``[...]``."""
    logits = np.concatenate([utilities, no_choice[..., None] * np.ones_like(utilities[..., :1])], axis=-1) / temperature
    logits = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def sample_choices(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of ``[N, K + 1]`` probabilities: the item index, or -1 for none."""
    cumulative = probabilities.cumsum(axis=1)
    draws = (rng.random(len(probabilities))[:, None] * cumulative[:, -1:] > cumulative).sum(axis=1)
    draws = np.minimum(draws, probabilities.shape[1] - 1)
    return np.where(draws == probabilities.shape[1] - 1, -1, draws)


def favourites(utilities: np.ndarray) -> np.ndarray:
    """Boolean ``[..., K]``: the items tied for the highest utility."""
    return np.isclose(utilities, utilities.max(axis=-1, keepdims=True), rtol=0, atol=1e-9)


# ---------------------------------------------------------------- the job

class SimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    catalog: list[Path] = Field(min_length=1)
    groups: Path
    n: int = Field(ge=1, description="number of impressions")
    k: int = Field(default=4, ge=2, description="items shown together")
    seed: int = 0
    pools: int = Field(default=10, ge=1, description="item pools: all candidates of an impression share one")
    brief_colour_share: float = Field(default=0.4, ge=0, le=1, description="share of briefs that name a colour")
    id_prefix: str = "sim"
    start: datetime = datetime(2025, 1, 1, tzinfo=timezone.utc)


class SimulationReport(BaseModel):
    impressions: int
    k: int
    items: int
    groups: list[str]
    temperature: float
    no_choice_rate: float
    bayes_accuracy: float = Field(description="expected accuracy of the Bayes-optimal predictor (impressions with a choice)")
    bayes_accuracy_realized: float = Field(description="its accuracy on the choices actually drawn")
    bayes_accuracy_by_group: dict[str, float]
    random_accuracy: float = Field(description="expected accuracy of a uniform guess")
    population_accuracy: float = Field(description="expected accuracy of the best group-agnostic predictor")
    disagree_any_share: float = Field(description="share of impressions whose groups' favourites differ")
    disagree_population_share: float = Field(description="share whose group's favourite is not the population's")


def _category_index(items: pd.DataFrame, pools: np.ndarray) -> dict[tuple, np.ndarray]:
    index: dict[tuple, np.ndarray] = {}
    keys = {"fine": ["pool", "sub_category", "gender"], "sub": ["pool", "sub_category"],
            "master": ["pool", "master_category"], "pool": ["pool"]}
    frame = items.assign(pool=pools)
    for level, columns in keys.items():
        for key, rows in frame.groupby(columns, sort=False).indices.items():
            index[(level, *(key if isinstance(key, tuple) else (key,)))] = rows
    return index


def brief_text(category: str, gender: str, colour: str | None = None, template: str = BRIEF_TEMPLATES[0]) -> str:
    """A brief as the simulated impressions phrase them: "red topwear for women"."""
    gender_phrase = "" if gender in UNKNOWN else (" unisex" if gender == "Unisex" else f" for {gender.lower()}")
    return template.format(colour=f"{colour.lower()} " if colour else "", category=category.lower(),
                           gender=gender_phrase)


def _brief_text(rng: np.random.Generator, category: str, gender: str, colour: str | None) -> str:
    return brief_text(category, gender, colour, BRIEF_TEMPLATES[rng.integers(len(BRIEF_TEMPLATES))])


def _draw_candidates(rng: np.random.Generator, anchor: int, candidates: np.ndarray, k: int) -> np.ndarray:
    chosen = {anchor}
    while len(chosen) < k:
        chosen.add(int(candidates[rng.integers(len(candidates))]))
    others = sorted(chosen - {anchor})
    picked = np.array([anchor, *others])
    rng.shuffle(picked)
    return picked


def simulate_impressions(config: SimulationConfig, progress: ProgressCallback | None = None
                         ) -> tuple[pd.DataFrame, SimulationReport]:
    """Draw ``config.n`` impressions of ``config.k`` catalog items; returns the impressions frame and the report."""
    report_progress = progress or (lambda done, total: None)
    spec = load_simulator_spec(config.groups)
    group_ids = list(spec.groups)
    items = catalog_attributes(config.catalog)
    pools = np.array([item_pool(pid, config.pools) for pid in items["product_id"]])
    pool_sizes = np.bincount(pools, minlength=config.pools).astype(np.float64)
    if (pool_sizes >= config.k).sum() == 0:
        raise ValueError(f"the catalog has too few items for K = {config.k} in any of {config.pools} pools")
    pool_sizes[pool_sizes < config.k] = 0
    index = _category_index(items, pools)
    rng = np.random.default_rng(config.seed)
    shares = np.array([spec.groups[g].share for g in group_ids])

    # 1. who sees what: pool, anchor, candidates, brief, group
    candidate_rows = np.zeros((config.n, config.k), dtype=np.int64)
    brief_colour = np.zeros((config.n, config.k), dtype=bool)
    briefs: list[str] = []
    sub, gender, master, colour = (items[c].to_numpy() for c in ("sub_category", "gender", "master_category", "colour"))
    chosen_pools = rng.choice(config.pools, size=config.n, p=pool_sizes / pool_sizes.sum())
    for i, pool in enumerate(chosen_pools):
        anchor = int(index[("pool", pool)][rng.integers(int(pool_sizes[pool]))])
        for key in (("fine", pool, sub[anchor], gender[anchor]), ("sub", pool, sub[anchor]),
                    ("master", pool, master[anchor]), ("pool", pool)):
            candidates = index[key]
            if len(candidates) >= config.k:
                break
        rows = _draw_candidates(rng, anchor, candidates, config.k)
        candidate_rows[i] = rows
        named_colour = colour[anchor] if colour[anchor] not in UNKNOWN and rng.random() < config.brief_colour_share else None
        if named_colour:
            brief_colour[i] = colour[rows] == named_colour
        briefs.append(_brief_text(rng, sub[anchor], gender[anchor], named_colour))
        if (i + 1) % 10_000 == 0:
            report_progress(i + 1, config.n)
    group_index = rng.choice(len(group_ids), size=config.n, p=shares / shares.sum())

    # 2. the truth: every group's probabilities for every impression, then the shown group's draw
    utilities = item_utilities(spec, items)[:, candidate_rows] + spec.brief_colour_bonus * brief_colour  # [G, n, k]
    no_choice = np.array([spec.groups[g].no_choice for g in group_ids])[:, None] * np.ones((1, config.n))
    probabilities_all = choice_probabilities(utilities, no_choice, spec.temperature)  # [G, n, k+1]
    rows = np.arange(config.n)
    probabilities = probabilities_all[group_index, rows]
    chosen = sample_choices(probabilities, rng)

    favourite = favourites(utilities)  # [G, n, k]
    population = np.tensordot(shares / shares.sum(), probabilities_all, axes=1)[:, :-1]  # [n, k]
    population_favourite = favourites(population)
    disagree_any = ~np.logical_and.reduce(favourite, axis=0).any(axis=1)
    disagree_population = ~(favourite[group_index, rows] & population_favourite).any(axis=1)

    product_ids = items["product_id"].to_numpy()
    frame = pd.DataFrame({
        "impression_id": [f"{config.id_prefix}-{config.seed}-{i:07d}" for i in range(config.n)],
        "group_id": [group_ids[g] for g in group_index],
        "brief": briefs,
        "items": [list(product_ids[r]) for r in candidate_rows],
        "chosen": [None if c < 0 else product_ids[candidate_rows[i, c]] for i, c in enumerate(chosen)],
        "timestamp": [config.start + timedelta(seconds=i) for i in range(config.n)],
        "source": "simulated",
        "sim_probabilities": [list(p) for p in probabilities],
        "sim_disagree_any": disagree_any,
        "sim_disagree_population": disagree_population,
    })
    report_progress(config.n, config.n)

    mask = np.ones((config.n, config.k), dtype=bool)
    by_group = {g: bayes_expected_accuracy(probabilities[group_index == i]) for i, g in enumerate(group_ids)
                if (group_index == i).any()}
    tie_share = population_favourite / population_favourite.sum(axis=1, keepdims=True)
    population_accuracy = (probabilities[:, :-1] * tie_share).sum() / (1 - probabilities[:, -1]).sum()
    report = SimulationReport(
        impressions=config.n, k=config.k, items=len(items), groups=group_ids, temperature=spec.temperature,
        no_choice_rate=float((chosen < 0).mean()),
        bayes_accuracy=bayes_expected_accuracy(probabilities, mask),
        bayes_accuracy_realized=float(top_choice_credit(probabilities[:, :-1], mask, chosen).mean()),
        bayes_accuracy_by_group=by_group,
        random_accuracy=1.0 / config.k,
        population_accuracy=float(population_accuracy),
        disagree_any_share=float(disagree_any.mean()),
        disagree_population_share=float(disagree_population.mean()),
    )
    return frame, report
