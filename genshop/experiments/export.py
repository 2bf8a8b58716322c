"""``genshop export ab``: an experiment folder of listings, images and a manifest.

Layout of ``OUT`` (written into a temporary sibling folder, then renamed into place, so
a reader never sees half an export; an existing ``OUT`` is replaced only with ``force``)::

    OUT/manifest.json                 experiment id, salt, arms, items, model versions, checksums
    OUT/listings.{parquet,csv,jsonl}  one row per listing (``manifest.Listing``)
    OUT/images/<sha256>.<ext>         each image once, named by its content

In the listings file ``category_path`` is a list (CSV: joined with " > "), ``attributes``
and ``scores`` are JSON objects (CSV and Parquet: JSON text), and each group's reward
also has its own ``score_<group>`` column.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from genshop.experiments.manifest import (MANIFEST_FILE, Arm, ExperimentInputError, Listing, Manifest, ManifestArm,
                                          ManifestItem, SLUG_PATTERN, Arms, file_sha256, inside)
from genshop.store import ITEM_NAMESPACE, BriefRecord, Store, UnknownBriefError, UnknownExperimentError

ProgressCallback = Callable[[int, int], None]  # (done, total)
LEVELS = ("master_category", "sub_category", "article_type")
BRIEF_ATTRIBUTES = ("article_type", "colour", "usage", "gender")


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path
    arms: Arms
    briefs: list[str] | None = Field(default=None, description="brief ids; None: every succeeded brief")
    experiment_id: str | None = Field(default=None, description="default: the name of the out folder (checked: a slug)")
    salt: str | None = Field(default=None, description="default: a fresh random salt, recorded in the manifest")
    format: Literal["parquet", "csv", "jsonl"] = "parquet"
    force: bool = False


def select_briefs(store: Store, brief_ids: list[str] | None) -> list[BriefRecord]:
    if brief_ids is None:
        briefs = store.list_briefs("succeeded")
        if not briefs:
            raise ExperimentInputError(["--all: no succeeded briefs to export"], "--briefs")
        return briefs
    issues, briefs = [], []
    for brief_id in dict.fromkeys(brief_ids):
        try:
            record = store.get_brief(brief_id)
        except UnknownBriefError:
            issues.append(f"brief {brief_id!r}: unknown")
            continue
        if record.status != "succeeded":
            issues.append(f"brief {brief_id!r}: status is {record.status}, only succeeded briefs can be exported")
        briefs.append(record)
    if issues:
        raise ExperimentInputError(issues, "--briefs")
    return briefs


def listing_id(arm: str, brief_id: str, item_id: str) -> str:
    """One item may be listed by several arms or matched to several briefs: each is its own listing."""
    return uuid.uuid5(ITEM_NAMESPACE, f"listing/{arm}/{brief_id}/{item_id}").hex


def _brief_attributes(brief: BriefRecord) -> dict[str, str]:
    return {name: getattr(brief.brief, name) for name in BRIEF_ATTRIBUTES if getattr(brief.brief, name)}


def _description(brief: BriefRecord, attributes: dict[str, str]) -> str:
    facts = ", ".join(f"{name.replace('_', ' ')}: {value}" for name, value in sorted(attributes.items()))
    return ". ".join(part for part in (brief.brief.description, facts) if part)


def item_best_of(timings: dict[str, float]) -> int:
    """N of the best-of-N pick that made an item (1: a single sample)."""
    return int(timings.get("best_of_n", 1))


def generated_listings(store: Store, arm: Arm, brief: BriefRecord) -> list[tuple[Listing, Path]]:
    """The brief's generated items that ``arm`` selects, with what the enrich and score stages found."""
    if arm.kind == "preset" and brief.preset != arm.value:
        return []
    items = [item for item in store.list_items(brief.id) if arm.selects(item.model_id, item_best_of(item.timings))]
    scores: dict[str, dict[str, float]] = {}
    reward_models: dict[str, str] = {}
    for score in store.list_scores(brief.id):
        scores.setdefault(score.item_id, {})[score.group_id] = score.score
        reward_models[score.item_id] = score.reward_model
    understood = {u.item_id: u for u in sorted(store.list_understandings([i.id for i in items]),
                                              key=lambda u: u.created_at)}
    listings = []
    for item in items:
        understanding = understood.get(item.id)
        attributes = dict(_brief_attributes(brief))
        title = brief.title
        if understanding is not None:
            found = {**understanding.categories, **understanding.attributes}
            attributes.update({name: value["label"] for name, value in found.items()
                               if value.get("label") and not value.get("abstained")})
            title = understanding.title or title
        listing = Listing(
            listing_id=listing_id(arm.name, brief.id, item.id), item_id=item.id, arm=arm.name, kind="generated",
            brief_id=brief.id, brief=brief.title, title=title, description=_description(brief, attributes),
            category_path=[attributes[level] for level in LEVELS if level in attributes], attributes=attributes,
            image="", image_sha256=item.image_sha256, scores=scores.get(item.id, {}), model_id=item.model_id,
            model_revision=item.model_revision, reward_model=reward_models.get(item.id))
        listings.append((listing, store.images.path(item.image_path)))
    return listings


def catalog_listings(store: Store, arm: Arm, brief: BriefRecord, products: list, salt: str) -> list[tuple[Listing, Path]]:
    """Up to ``variants`` real products whose attributes match every attribute the brief names,
    drawn by a salted hash of their product ids (so an export is reproducible)."""
    wanted = _brief_attributes(brief)
    if not wanted:
        raise ExperimentInputError([f"arm {arm.name!r} (catalog): brief {brief.id!r} names none of "
                                    f"{', '.join(BRIEF_ATTRIBUTES)} to match catalog products by"], "--arms")
    matches = [p for p in products if all(p.attributes.get(k, "").lower() == v.lower() for k, v in wanted.items())]
    matches.sort(key=lambda p: hashlib.sha256(f"{salt}:{brief.id}:{p.product_id}".encode()).hexdigest())
    listings = []
    for product in matches[: brief.brief.variants]:
        attributes = {k: v for k, v in product.attributes.items() if v}
        listing = Listing(
            listing_id=listing_id(arm.name, brief.id, product.id), item_id=product.id, arm=arm.name, kind="catalog",
            brief_id=brief.id, brief=brief.title, title=product.title, description=_description(brief, attributes),
            category_path=[attributes[level] for level in LEVELS if level in attributes], attributes=attributes,
            image="", image_sha256=product.image_sha256, scores={}, model_id="catalog",
            model_revision=product.product_id)
        listings.append((listing, store.images.path(product.image_path)))
    return listings


def write_listings(listings: list[Listing], groups: list[str], folder: Path, fmt: str) -> Path:
    rows = []
    for listing in listings:
        row = listing.model_dump()
        row.update({f"score_{group}": listing.scores.get(group) for group in groups})
        if fmt != "jsonl":
            row["attributes"], row["scores"] = json.dumps(listing.attributes), json.dumps(listing.scores)
        if fmt == "csv":
            row["category_path"] = " > ".join(listing.category_path)
        rows.append(row)
    frame = pd.DataFrame(rows)
    path = folder / f"listings.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def _replace_folder(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an existing ``out`` is swapped aside first and removed after."""
    previous = out.with_name(f".{out.name}.previous-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if previous:
        out.rename(previous)
    try:
        staging.rename(out)
    except OSError:
        if previous:
            previous.rename(out)
        raise
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


def export_ab(store: Store, config: ExportConfig, progress: ProgressCallback | None = None) -> Manifest:
    out = config.out.resolve()
    experiment_id = config.experiment_id or out.name
    issues = []
    if out.exists() and not config.force:
        issues.append(f"out: {out} exists; pass --force to replace it")
    if not re.fullmatch(SLUG_PATTERN, experiment_id):
        issues.append(f"experiment: {experiment_id!r} is not a valid id (letters, digits, '_' and '-', at most 64); "
                      "pass --experiment")
    try:
        if store.list_ab_results(store.get_experiment(experiment_id).id):
            issues.append(f"experiment: {experiment_id!r} already has imported results; export under a new id")
    except UnknownExperimentError:
        pass
    if issues:
        raise ExperimentInputError(issues, "export")
    briefs = select_briefs(store, config.briefs)
    salt = config.salt or secrets.token_hex(8)
    products = store.list_catalog_products() if any(arm.kind == "catalog" for arm in config.arms) else []
    if any(arm.kind == "catalog" for arm in config.arms) and not products:
        raise ExperimentInputError(["a catalog arm needs catalog products: run `genshop catalog import` first"], "--arms")

    selected: list[tuple[Listing, Path]] = []
    for arm in config.arms:
        arm_listings, pages = [], set()
        for brief in briefs:
            if arm.kind == "catalog":  # one page of real products per brief title, however many briefs share it
                if brief.title not in pages:
                    arm_listings += catalog_listings(store, arm, brief, products, salt)
                pages.add(brief.title)
            else:
                arm_listings += generated_listings(store, arm, brief)
        if not arm_listings:
            issues.append(f"arm {arm.name!r} ({arm.selector}): selects no listings for these briefs")
        selected += arm_listings
    if issues:
        raise ExperimentInputError(issues, "--arms")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    (staging / "images").mkdir(parents=True)
    try:
        listings = []
        for done, (listing, source) in enumerate(selected, start=1):
            image = f"images/{listing.image_sha256}{source.suffix.lower() or '.png'}"
            target = inside(staging, image)
            if not target.exists():
                shutil.copyfile(source, target)
            listings.append(listing.model_copy(update={"image": image}))
            if progress:
                progress(done, len(selected))
        groups = sorted({g for brief in briefs for g in brief.brief.groups} | {g for l in listings for g in l.scores})
        listings_path = write_listings(listings, groups, staging, config.format)
        files = {path.relative_to(staging).as_posix(): file_sha256(path)
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        brief_colour = {brief.id: brief.brief.colour for brief in briefs}
        manifest = Manifest(
            experiment_id=experiment_id, created_at=datetime.now(timezone.utc), salt=salt, control=config.arms[0].name,
            arms=[ManifestArm(**arm.model_dump(), listings=sum(l.arm == arm.name for l in listings))
                  for arm in config.arms],
            groups=groups, briefs=[brief.id for brief in briefs], listings_file=listings_path.name,
            items={l.listing_id: ManifestItem(arm=l.arm, brief=l.brief, brief_colour=brief_colour[l.brief_id],
                                              image=l.image, attributes=l.attributes) for l in listings},
            model_versions={arm.name: sorted({f"{l.model_id}@{l.model_revision}" for l in listings
                                              if l.arm == arm.name and l.kind == "generated"}) for arm in config.arms},
            reward_models=sorted({l.reward_model for l in listings if l.reward_model}),
            files=files,
        )
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    store.save_experiment(experiment_id, manifest.model_dump(mode="json"), str(out))
    return manifest
