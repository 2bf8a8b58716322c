"""``genshop import ab-results``: a shop's funnel counts, validated against the manifest,
stored, and turned into preference data for the reward model.

Results file (Parquet or CSV), one row per listing and customer group:

| column | |
| --- | --- |
| experiment_id | the exported experiment (one per file) |
| listing_id | a listing of that experiment |
| arm | the listing's arm (checked against the manifest) |
| group_id | a customer group of ``configs/groups.yaml`` |
| impressions, clicks, add_to_carts, purchases | non-negative counts, each at most the one before |

All or nothing: every row is checked first (an unknown experiment, an unknown listing, an
arm that is not the listing's, an unknown group, a negative, non-integer or inconsistent
count, a repeated listing and group), each problem named with its row (1-based), and
nothing is stored unless all rows pass. Importing an experiment again needs ``replace``.

Preference data: for every brief and group, the listings of all arms for that brief
compete as one impression of K items (their exported images). Customers never saw all
arms at once, so the import does not invent impressions they did not have; it writes
choices in proportion to each listing's observed CTR (``clicks / impressions``), one
choice per observed click (at most ``max_choices`` per brief and group, rounded by the
largest remainder), source ``ab_import``. Under a multinomial logit the CTR of a listing is
proportional to ``exp(utility)`` within its arm, so these choice shares rank listings
as the customers did.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ValidationError

from genshop.experiments.manifest import ExperimentInputError, Manifest, inside
from genshop.store import AbResult, Store, UnknownExperimentError
from reward.impressions import COLUMNS, write_impressions

RESULT_COLUMNS = ("experiment_id", "listing_id", "arm", "group_id", "impressions", "clicks", "add_to_carts", "purchases")
COUNTS = ("impressions", "clicks", "add_to_carts", "purchases")


class ResultsImportReport(BaseModel):
    experiment_id: str
    rows: int
    preferences: str
    preference_impressions: int


def read_result_rows(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ExperimentInputError([f"{path.name}: expected a .parquet or .csv file"], str(path))
    try:
        frame = (pd.read_parquet(path) if suffix == ".parquet" else
                 pd.read_csv(path, dtype={"experiment_id": str, "listing_id": str, "arm": str, "group_id": str}))
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ExperimentInputError([f"{path.name}: cannot be read ({exc})"], str(path)) from None
    missing = [column for column in RESULT_COLUMNS if column not in frame.columns]
    if missing:
        raise ExperimentInputError([f"missing column(s) {', '.join(missing)}"], str(path))
    return frame


def _short(value, limit: int = 80) -> str:
    """A value for an error message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_results(frame: pd.DataFrame, store: Store, known_groups: set[str], source: str
                     ) -> tuple[Manifest, str, list[AbResult]]:
    """Every row checked against the experiment's manifest; raises with all problems, row by row."""
    if frame.empty:
        raise ExperimentInputError(["no result rows"], source)
    experiment_id = str(frame["experiment_id"].iloc[0])
    try:
        experiment = store.get_experiment(experiment_id)
    except UnknownExperimentError:
        raise ExperimentInputError([f"row 1: experiment_id {_short(experiment_id)} is unknown (export it first)"], source) from None
    manifest = Manifest.model_validate(experiment.manifest)
    issues, results, seen = [], [], {}
    for number, row in enumerate(frame[list(RESULT_COLUMNS)].to_dict("records"), start=1):
        where = f"row {number}"
        row = {key: (None if isinstance(value, float) and np.isnan(value) else value) for key, value in row.items()}
        if str(row["experiment_id"]) != experiment_id:
            issues.append(f"{where}: experiment_id {_short(row['experiment_id'])} differs from row 1's {experiment_id!r} "
                          "(one experiment per file)")
            continue
        for name in COUNTS:
            value = row[name]
            if isinstance(value, float) and value.is_integer():
                row[name] = int(value)
        try:
            result = AbResult.model_validate({**row, "listing_id": str(row["listing_id"]), "arm": str(row["arm"]),
                                              "group_id": str(row["group_id"])})
        except ValidationError as exc:
            issues += [f"{where}: {'.'.join(map(str, e['loc']))}: {e['msg']} (got {_short(e.get('input'))})"
                       for e in exc.errors(include_url=False)]
            continue
        item = manifest.items.get(result.listing_id)
        if item is None:
            issues.append(f"{where}: listing_id {_short(result.listing_id)} is not a listing of experiment "
                          f"{experiment_id!r}")
        elif item.arm != result.arm:
            issues.append(f"{where}: arm {result.arm!r} does not match listing {result.listing_id}'s arm {item.arm!r}")
        if result.group_id not in known_groups:
            issues.append(f"{where}: group_id {_short(result.group_id)} is unknown (known: {', '.join(sorted(known_groups))})")
        for smaller, larger in zip(COUNTS[1:], COUNTS[:-1]):
            if getattr(result, smaller) > getattr(result, larger):
                issues.append(f"{where}: {smaller} ({getattr(result, smaller)}) exceeds {larger} ({getattr(result, larger)})")
        key = (result.listing_id, result.group_id)
        if key in seen:
            issues.append(f"{where}: listing {result.listing_id} and group {result.group_id} repeat row {seen[key]}")
        seen.setdefault(key, number)
        results.append(result)
    if issues:
        raise ExperimentInputError(issues, source)
    return manifest, experiment.export_dir, results


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``shares``."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    return counts


def preferences_from_results(manifest: Manifest, export_dir: str | Path, results: list[AbResult],
                             max_choices: int = 1000) -> pd.DataFrame:
    """Impressions (reward format v1) from funnel counts: see the module docstring."""
    export_dir = Path(export_dir)
    totals: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for result in results:
        counts = totals[(manifest.items[result.listing_id].brief, result.group_id)][result.listing_id]
        counts[0] += result.impressions
        counts[1] += result.clicks
    timestamp = datetime.now(timezone.utc)
    rows = []
    for (brief, group), by_listing in sorted(totals.items()):
        shown = sorted(listing for listing, (impressions, _) in by_listing.items() if impressions > 0)
        clicks = np.array([by_listing[listing][1] for listing in shown])
        if len(shown) < 2 or clicks.sum() == 0:
            continue
        ctr = clicks / np.array([by_listing[listing][0] for listing in shown])
        images = [str(inside(export_dir, manifest.items[listing].image)) for listing in shown]
        choices = largest_remainder(ctr, min(int(clicks.sum()), max_choices))
        key = hashlib.sha256(f"{manifest.experiment_id}/{brief}/{group}".encode()).hexdigest()[:12]
        n = 0
        for index, count in enumerate(choices):
            for _ in range(count):
                order = images[n % len(images):] + images[: n % len(images)]  # rotate display order
                rows.append({**dict.fromkeys(COLUMNS), "impression_id": f"ab/{manifest.experiment_id}/{key}/{n}", "group_id": group,
                             "brief": brief, "items": order, "chosen": images[index], "timestamp": timestamp,
                             "source": "ab_import"})
                n += 1
    return pd.DataFrame(rows, columns=COLUMNS)


def import_ab_results(store: Store, path: str | Path, known_groups: set[str], preferences_dir: str | Path,
                      replace: bool = False) -> ResultsImportReport:
    frame = read_result_rows(path)
    manifest, export_dir, results = validate_results(frame, store, known_groups, str(path))
    if store.list_ab_results(manifest.experiment_id) and not replace:
        raise ExperimentInputError([f"experiment {manifest.experiment_id!r} already has imported results; "
                                    "pass --replace to replace them"], str(path))
    preferences = preferences_from_results(manifest, export_dir, results)
    out = Path(preferences_dir) / f"ab-{manifest.experiment_id}.parquet"
    staged = write_impressions(preferences, out.with_name(f".{out.name}.staged"))
    try:
        store.replace_ab_results(manifest.experiment_id, results)
        staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)
    return ResultsImportReport(experiment_id=manifest.experiment_id, rows=len(results), preferences=str(out),
                               preference_impressions=len(preferences))
