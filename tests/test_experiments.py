"""A/B experiments: export, assignment, results import, readout, simulation, and the loop back
into reward training, through the real CLI, a real SQLite store and real files."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from genshop.experiments.manifest import (Arm, ExperimentInputError, Manifest, ManifestArm, ManifestItem, assign_arm,
                                         file_sha256, inside, parse_arms)
from genshop.experiments.readout import relative_uplift, sample_ratio_check
from genshop.experiments.simulation import AbSimulationConfig, simulate_ab
from genshop.store import AbResult
from genshop.experiments.results import largest_remainder
from reward.synthetic import write_synthetic_catalog
from genshop.settings import REPO_ROOT
from tests.conftest import cli_json_here, invoke_cli, make_env

BRIEFS = (
    {"title": "Men's black tshirt", "article_type": "Tshirts", "colour": "Black", "gender": "Men", "groups": ["A", "C"],
     "variants": 3, "seed": 1, "width": 32, "height": 32},
    {"title": "Women's red kurta", "article_type": "Kurtas", "colour": "Red", "gender": "Women", "groups": ["B"],
     "variants": 3, "seed": 2, "width": 32, "height": 32},
)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(db: Path, table: str) -> int:
    return sqlite3.connect(db).execute(f"select count(*) from {table}").fetchone()[0]


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory, models_dir) -> tuple[Path, list[str]]:
    """Two generated briefs and a small real-format catalog in one store, built once per module."""
    home = tmp_path_factory.mktemp("experiments") / "home"
    env = make_env(home, models_dir)
    brief_ids = []
    for number, fields in enumerate(BRIEFS):
        path = home.parent / f"brief-{number}.json"
        path.write_text(json.dumps(fields))
        brief_ids.append(cli_json_here(["submit", str(path), "--local", "--json"], env)["brief_id"])
    write_synthetic_catalog(home.parent / "catalog.parquet", 2000, seed=3)
    cli_json_here(["catalog", "import", str(home.parent / "catalog.parquet"), "--no-enrich", "--json"], env)
    return home, brief_ids


@pytest.fixture
def experiment_home(seeded_home, tmp_path, models_dir) -> tuple[dict[str, str], list[str]]:
    """This test's own copy of the seeded store: its environment and the brief ids."""
    home, brief_ids = seeded_home
    shutil.copytree(home, tmp_path / "home")
    return make_env(tmp_path / "home", models_dir), brief_ids


def test_the_loop_export_simulate_import_report_and_retrain(tmp_path, experiment_home, open_clip_dir):
    env, brief_ids = experiment_home
    out = tmp_path / "exports" / "exp-1"
    manifest = cli_json_here(["export", "ab", "--all", "--arms", "control=catalog,base=generated", "--weights", "1,1",
                         "--out", str(out), "--salt", "s1", "--json"], env)

    # the export: listings of both arms for both briefs, images inside, every file checksummed
    assert manifest["experiment_id"] == "exp-1" and manifest["control"] == "control"
    assert [(a["name"], a["listings"]) for a in manifest["arms"]] == [("control", 6), ("base", 6)]  # 3 variants per brief
    listings = pd.read_parquet(out / "listings.parquet")
    assert len(listings) == 12 and set(listings["arm"]) == {"control", "base"}
    assert set(listings["brief_id"]) == set(brief_ids) and set(manifest["groups"]) == {"A", "B", "C"}
    catalog = listings[listings["kind"] == "catalog"]
    for _, row in catalog.iterrows():  # catalog products matched on every attribute the brief names
        attributes = json.loads(row["attributes"])
        brief = next(b for b in BRIEFS if b["title"] == row["brief"])
        assert (attributes["article_type"], attributes["colour"], attributes["gender"]) == (
            brief["article_type"], brief["colour"], brief["gender"])
    assert all((out / image).is_file() and not Path(image).is_absolute() for image in listings["image"])
    assert manifest["files"] == {k: v for k, v in _tree(out).items() if k != "manifest.json"}
    assert set(manifest["model_versions"]["base"]) and manifest["model_versions"]["control"] == []
    assert {"score_A", "score_B", "score_C", "title", "description", "category_path"} <= set(listings.columns)

    # an existing export is never overwritten without --force
    before = _tree(out)
    refused = invoke_cli(["export", "ab", "--all", "--arms", "control=catalog,base=generated", "--out", str(out)], env)
    assert refused.returncode == 2 and "--force" in refused.stderr and _tree(out) == before

    # simulate the shop, import its results: stored, and written as preference data
    results = tmp_path / "results.parquet"
    assert invoke_cli(["simulate", "ab", "exp-1", "--customers", "3000", "--out", str(results)], env).returncode == 0
    imported = cli_json_here(["import", "ab-results", str(results), "--json"], env)
    frame = pd.read_parquet(results)
    assert imported["rows"] == len(frame) and imported["preference_impressions"] > 0
    from reward.impressions import read_impressions

    preferences = read_impressions(imported["preferences"])
    assert set(preferences["source"]) == {"ab_import"} and set(preferences["group_id"]) <= {"A", "B", "C", "D"}
    assert all(Path(item).is_file() and Path(item).is_relative_to(out) for items in preferences["items"] for item in items)
    assert all(chosen in items for chosen, items in zip(preferences["chosen"], preferences["items"]))

    # the readout: per arm and group, uplift with its CI, no sample-ratio mismatch under the salted hash
    report = cli_json_here(["report", "ab", "exp-1", "--json"], env)
    base = next(r for r in report["arms"] if r["arm"] == "base")
    uplift = base["ctr_uplift"]
    assert uplift["ci_low"] < uplift["relative"] < uplift["ci_high"]
    assert base["ctr"] == pytest.approx(base["clicks"] / base["impressions"])
    assert not report["srm"]["mismatch"] and {r["group"] for r in report["groups"]} <= {"A", "B", "C", "D"}
    assert Path(report["plot"]).is_file() and Path(report["plot"]).stat().st_size > 5000

    # the loop closes: the imported preferences train a reward model
    trained = invoke_cli(["reward", "train", "--impressions", imported["preferences"], "--clip", str(open_clip_dir),
                          "--out", str(tmp_path / "reward"), "--epochs", "1", "--threads", "1", "--split", "impressions"],
                         env)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert (tmp_path / "reward" / "model" / "config.json").is_file()

    # ... and tune group A's LoRA on them (offline), whose designs go into the next experiment as their own arm
    briefs = tmp_path / "tune-briefs.yaml"
    briefs.write_text(json.dumps([BRIEFS[0]]))
    tuned = invoke_cli(["tune", "--group", "A", "--briefs", str(briefs), "--reward", str(tmp_path / "reward" / "model"),
                        "--preferences", imported["preferences"], "--out", str(tmp_path / "tune-A"), "--steps", "2",
                        "--inference-steps", "2", "--threads", "1"], env)
    assert tuned.returncode == 0, (tuned.stdout + tuned.stderr)[-3000:]
    shutil.copytree(tmp_path / "tune-A" / "adapter", Path(env["GENSHOP_HOME"]) / "adapters" / "A")
    again = tmp_path / "again.json"
    again.write_text(json.dumps({**BRIEFS[0], "groups": ["A"], "seed": 9}))
    second = cli_json_here(["submit", str(again), "--local", "--json"], env)["brief_id"]
    base_model = cli_json_here(["results", brief_ids[0], "--json"], env)["items"][0]["model_id"]
    next_round = cli_json_here(["export", "ab", "--briefs", f"{brief_ids[0]},{second}", "--arms",
                           f"base=model:{base_model},tuned=model:{base_model}+lora:A,catalog=catalog", "--out",
                           str(tmp_path / "exports" / "exp-2"), "--json"], env)
    # two briefs with one title are one page: the catalog arm shows one set of products for it
    assert [(a["name"], a["listings"]) for a in next_round["arms"]] == [("base", 3), ("tuned", 3), ("catalog", 3)]
    assert all("+lora:A@" in version for version in next_round["model_versions"]["tuned"])
    assert invoke_cli(["simulate", "ab", "exp-2", "--customers", "2000", "--out", str(tmp_path / "r2.parquet")],
                   env).returncode == 0
    assert invoke_cli(["import", "ab-results", str(tmp_path / "r2.parquet")], env).returncode == 0
    tuned_readout = next(r for r in cli_json_here(["report", "ab", "exp-2", "--json"], env)["arms"] if r["arm"] == "tuned")
    assert tuned_readout["impressions"] > 0 and tuned_readout["ctr_uplift"] is not None


def test_bad_results_are_refused_row_by_row_and_nothing_is_stored(tmp_path, experiment_home):
    env, _ = experiment_home
    out = tmp_path / "exp-2"
    assert invoke_cli(["export", "ab", "--all", "--arms", "control=catalog,base=generated", "--out", str(out)], env).returncode == 0
    results = tmp_path / "results.csv"
    assert invoke_cli(["simulate", "ab", "exp-2", "--customers", "500", "--out", str(results)], env).returncode == 0
    good = pd.read_csv(results, dtype={"listing_id": str})
    bad = good.copy()
    bad.loc[0, "clicks"] = -1
    bad.loc[1, "listing_id"] = "no-such-listing"
    bad.loc[2, "arm"] = "control" if bad.loc[2, "arm"] == "base" else "base"
    bad.loc[3, "group_id"] = "Z"
    bad.loc[4, "clicks"] = bad.loc[4, "impressions"] + 1
    bad = pd.concat([bad, bad.iloc[[5]]], ignore_index=True)  # a repeated listing and group
    bad.to_csv(tmp_path / "bad.csv", index=False)
    db = Path(env["GENSHOP_HOME"]) / "genshop.db"

    proc = invoke_cli(["import", "ab-results", str(tmp_path / "bad.csv")], env)
    assert proc.returncode == 2
    for expected in ("row 1: clicks", "row 2: listing_id 'no-such-listing'", "row 3: arm", "row 4: group_id 'Z'",
                     "row 5: clicks", f"row {len(bad)}: listing"):
        assert expected in proc.stderr, (expected, proc.stderr)
    assert _rows(db, "ab_results") == 0 and not (Path(env["GENSHOP_HOME"]) / "preferences" / "ab-exp-2.parquet").exists()

    wrong_experiment = good.assign(experiment_id="exp-unknown")
    wrong_experiment.to_csv(tmp_path / "unknown.csv", index=False)
    proc = invoke_cli(["import", "ab-results", str(tmp_path / "unknown.csv")], env)
    assert proc.returncode == 2 and "'exp-unknown' is unknown" in proc.stderr

    assert invoke_cli(["import", "ab-results", str(results)], env).returncode == 0
    again = invoke_cli(["import", "ab-results", str(results)], env)
    assert again.returncode == 2 and "--replace" in again.stderr and _rows(db, "ab_results") == len(good)
    assert invoke_cli(["import", "ab-results", str(results), "--replace"], env).returncode == 0
    assert _rows(db, "ab_results") == len(good)


def test_export_input_errors_name_the_field_and_write_nothing(tmp_path, experiment_home):
    env, _ = experiment_home
    cases = [
        (["--all", "--arms", "control=catalog"], "need at least two arms"),
        (["--all", "--arms", "control=catalog,base=sometimes"], "arms[1] 'base=sometimes': selector"),
        (["--all", "--arms", "a=catalog,a=generated"], "arm name 'a' is used twice"),
        (["--all", "--arms", "control=catalog,base=generated", "--weights", "1,0"], "weight"),
        (["--all", "--arms", "control=catalog,base=preset:no-such-preset"], "selects no listings"),
        (["--briefs", "nope", "--arms", "control=catalog,base=generated"], "brief 'nope': unknown"),
        (["--all", "--arms", "control=catalog,base=generated", "--experiment", "../escape"], "not a valid id"),
        (["--all", "--arms", "../x=catalog,base=generated"], "arms[0] '../x=catalog': name"),
    ]
    for args, message in cases:
        out = tmp_path / "exports" / "x"
        proc = invoke_cli(["export", "ab", *args, "--out", str(out)], env)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())
    assert _rows(Path(env["GENSHOP_HOME"]) / "genshop.db", "experiments") == 0


def test_paths_cannot_escape_the_export_folder(tmp_path):
    assert inside(tmp_path, "images/a.png") == (tmp_path / "images" / "a.png").resolve()
    for bad in ("../a.png", "images/../../a.png", "/etc/passwd"):
        with pytest.raises(ExperimentInputError):
            inside(tmp_path, bad)


def test_assignment_is_a_reproducible_salted_hash_in_proportion_to_the_weights():
    arms = parse_arms("control=catalog,base=generated,tuned=model:m+A", "1,1,2")
    units = [f"customer-{i}" for i in range(20_000)]
    first = [assign_arm(u, "salt-1", arms) for u in units]
    assert first == [assign_arm(u, "salt-1", arms) for u in units]
    counts = Counter(first)
    assert counts["tuned"] / len(units) == pytest.approx(0.5, abs=0.015)
    assert counts["control"] / len(units) == pytest.approx(0.25, abs=0.015)
    other_salt = [assign_arm(u, "salt-2", arms) for u in units]
    assert 0.55 < sum(a != b for a, b in zip(first, other_salt)) / len(units) < 0.70  # independent draws: 1 - sum p^2
    assert assign_arm("x", "s", [Arm(name="only", selector="catalog")]) == "only"


def test_relative_uplift_matches_the_formula():
    uplift = relative_uplift(120, 1000, 100, 1000)
    p1, p0 = 0.12, 0.10
    se = math.sqrt((1 - p1) / 120 + (1 - p0) / 100)
    assert uplift.relative == pytest.approx(0.2)
    assert uplift.ci_low == pytest.approx(math.exp(math.log(1.2) - 1.959964 * se) - 1, rel=1e-5)
    assert uplift.ci_high == pytest.approx(math.exp(math.log(1.2) + 1.959964 * se) - 1, rel=1e-5)
    pooled = 220 / 2000
    z = (p1 - p0) / math.sqrt(pooled * (1 - pooled) * 2 / 1000)
    assert uplift.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-6)
    assert relative_uplift(0, 1000, 100, 1000) is None


def test_largest_remainder_keeps_the_total_and_the_proportions():
    assert largest_remainder(pd.Series([0.1, 0.2, 0.3]).to_numpy(), 6).tolist() == [1, 2, 3]
    counts = largest_remainder(pd.Series([1.0, 1.0, 1.0]).to_numpy(), 10)
    assert counts.sum() == 10 and sorted(counts.tolist()) == [3, 3, 4]


def _synthetic_manifest(salt: str) -> Manifest:
    """Two briefs; control shows 2 catalog listings per brief, base 5 generated ones (unequal on purpose)."""
    items = {}
    for brief, colour in (("Men's black tshirt", "Black"), ("Women's red kurta", "Red")):
        for arm, count in (("control", 2), ("base", 5)):
            for n in range(count):
                items[f"{arm}-{brief[:3]}-{n}"] = ManifestItem(
                    arm=arm, brief=brief, brief_colour=colour, image=f"images/{arm}{n}.png",
                    attributes={"colour": colour if n % 2 else "Blue", "article_type": "Tshirts", "usage": "Casual",
                                "gender": "Men"})
    return Manifest(experiment_id="exp-srm", created_at=datetime.now(timezone.utc), salt=salt, control="control",
                    arms=[ManifestArm(name="control", selector="catalog", listings=4),
                          ManifestArm(name="base", selector="generated", listings=10)],
                    groups=["A", "B"], briefs=["b1", "b2"], listings_file="listings.parquet", items=items,
                    model_versions={}, reward_models=[], files={})


def test_the_sample_ratio_check_counts_customers_and_flags_a_skewed_split():
    """Page views, not clustered impressions, are the randomized unit: under the design the
    check stays quiet across salts (alpha = 0.001), and losing half the control's traffic is flagged."""
    config = AbSimulationConfig(groups=REPO_ROOT / "configs" / "groups.yaml", customers=3000)
    flagged, skewed_p = 0, []
    for salt in range(12):
        manifest = _synthetic_manifest(f"salt-{salt}")
        frame = simulate_ab(manifest, config.model_copy(update={"seed": salt}))
        check = sample_ratio_check(manifest, [AbResult(**row) for row in frame.to_dict("records")])
        flagged += check.mismatch
        assert sum(check.observed.values()) == pytest.approx(3000, abs=0.1)  # every customer is one page view
        control = frame["arm"] == "control"
        for column in ("impressions", "clicks", "add_to_carts", "purchases"):
            frame.loc[control, column] = frame.loc[control, column] // 2  # half the control's traffic went missing
        skewed_p.append(sample_ratio_check(manifest, [AbResult(**row) for row in frame.to_dict("records")]).p_value)
    assert flagged <= 1  # 0.012 expected; the old impression-level test flagged 2 of these 12
    assert max(skewed_p) < 1e-6


def test_counts_past_64_bits_non_finite_weights_and_repeated_arms_are_refused_by_name(tmp_path, experiment_home):
    from genshop.experiments.export import ExportConfig

    env, _ = experiment_home
    out = tmp_path / "exp-3"
    assert invoke_cli(["export", "ab", "--all", "--arms", "control=catalog,base=generated", "--out", str(out)],
                      env).returncode == 0
    results = tmp_path / "results.csv"
    assert invoke_cli(["simulate", "ab", "exp-3", "--customers", "200", "--out", str(results)], env).returncode == 0
    good = pd.read_csv(results, dtype={"listing_id": str})
    lines = results.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    rows[1][header.index("impressions")] = str(2**63)  # row 2
    rows[2][header.index("impressions")] = str(2**70)  # row 3
    rows[3][header.index("clicks")] = "1e20"  # row 4
    (tmp_path / "huge.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    proc = invoke_cli(["import", "ab-results", str(tmp_path / "huge.csv")], env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr, proc.stdout)
    for expected in ("row 2: impressions", "row 3: impressions", "row 4: clicks"):
        assert expected in proc.stderr, (expected, proc.stderr)
    assert _rows(Path(env["GENSHOP_HOME"]) / "genshop.db", "ab_results") == 0 and len(good) == len(rows)

    for weights in ("inf,1", "nan,1", "1e308,1", "1,1e308"):
        proc = invoke_cli(["export", "ab", "--all", "--arms", "control=catalog,base=generated", "--weights", weights,
                           "--out", str(tmp_path / "exports" / "w")], env)
        assert proc.returncode == 2 and "weight" in proc.stderr, (weights, proc.stderr)
    assert not (tmp_path / "exports").exists()
    with pytest.raises(ValueError, match="arm names must be unique"):
        ExportConfig(out=tmp_path / "x", arms=[Arm(name="a", selector="catalog"), Arm(name="a", selector="generated")])
