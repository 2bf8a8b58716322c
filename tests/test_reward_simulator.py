"""The simulator: groups genuinely disagree, hidden utilities stay hidden, the Bayes ceiling is right."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from genshop.settings import REPO_ROOT
from reward.groups import Group, load_groups
from reward.impressions import read_impressions
from reward.metrics import top_choice_credit
from reward.simulator import (SimulationConfig, catalog_attributes, item_utilities, load_simulator_spec,
                              sample_choices, simulate_impressions)
from reward.splits import item_pool
from reward.synthetic import write_synthetic_catalog

GROUPS = REPO_ROOT / "configs" / "groups.yaml"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return write_synthetic_catalog(tmp_path_factory.mktemp("sim") / "catalog.parquet", 400, seed=1)


def test_groups_file_keeps_models_and_simulator_apart():
    groups = load_groups(GROUPS)
    assert [g.id for g in groups] == ["A", "B", "C", "D"]
    assert all(g.name and g.age_band and g.region and g.taste_tags for g in groups)
    assert set(Group.model_fields) == {"id", "name", "age_band", "region", "taste_tags"}  # no utilities
    assert set(load_simulator_spec(GROUPS).groups) == {"A", "B", "C", "D"}


def test_groups_genuinely_disagree(catalog):
    spec = load_simulator_spec(GROUPS)
    utilities = item_utilities(spec, catalog_attributes([catalog]))  # [groups, items]
    ids = list(spec.groups)
    # for every pair of groups, some items one loves (utility >= 1) the other avoids (<= -1)
    loved_and_avoided = [(ids[a], ids[b]) for a in range(len(ids)) for b in range(len(ids))
                         if a != b and ((utilities[a] >= 1) & (utilities[b] <= -1)).any()]
    assert len(loved_and_avoided) >= 8, loved_and_avoided
    frame, report = simulate_impressions(SimulationConfig(catalog=[catalog], groups=GROUPS, n=3000, k=4, seed=0))
    assert report.disagree_any_share > 0.5 and report.disagree_population_share > 0.2
    assert report.bayes_accuracy - report.population_accuracy > 0.1  # knowing the group is worth a lot
    assert 0.0 < report.no_choice_rate < 0.5
    assert set(frame["group_id"]) == {"A", "B", "C", "D"}


def test_bayes_optimal_accuracy_matches_monte_carlo(catalog):
    frame, report = simulate_impressions(SimulationConfig(catalog=[catalog], groups=GROUPS, n=3000, k=4, seed=3))
    probabilities = np.stack(frame["sim_probabilities"].to_numpy())
    mask = np.ones((len(frame), 4), dtype=bool)
    rng = np.random.default_rng(0)
    hits = choices = 0.0
    for _ in range(300):  # redraw every impression's choice from the true probabilities
        chosen = sample_choices(probabilities, rng)
        hits += top_choice_credit(probabilities[:, :-1], mask, chosen).sum()
        choices += (chosen >= 0).sum()
    assert hits / choices == pytest.approx(report.bayes_accuracy, abs=0.004)
    assert report.bayes_accuracy_realized == pytest.approx(report.bayes_accuracy, abs=0.03)
    assert (chosen < 0).mean() == pytest.approx(probabilities[:, -1].mean(), abs=0.01)


def test_candidates_share_a_pool_and_cli_writes_parquet_or_jsonl(catalog, tmp_path):
    from genshop.cli_reward import simulate

    out = tmp_path / "imp.parquet"
    result = CliRunner().invoke(simulate, ["impressions", "--catalog", str(catalog), "--groups", str(GROUPS),
                                           "--n", "200", "--k", "3", "--out", str(out), "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "Bayes-optimal accuracy" in result.output
    frame = read_impressions(out)
    assert len(frame) == 200 and all(len(items) == 3 for items in frame["items"])
    assert all(len({item_pool(i, 10) for i in items}) == 1 for items in frame["items"])
    assert frame["impression_id"].is_unique
    assert (tmp_path / "imp.parquet.report.json").is_file()
    jsonl = tmp_path / "imp.jsonl"
    result = CliRunner().invoke(simulate, ["impressions", "--catalog", str(catalog), "--n", "20", "--out", str(jsonl)])
    assert result.exit_code == 0, result.output
    assert len(jsonl.read_text().splitlines()) == 20


def test_the_attribute_reader_scores_a_perfect_reading_exactly_as_the_simulator_does(catalog):
    from reward.ceiling import label_posteriors, named_colour, reader_scores

    spec = load_simulator_spec(GROUPS)
    frame, _ = simulate_impressions(SimulationConfig(catalog=[catalog], groups=GROUPS, n=2000, k=4, seed=7))
    items = catalog_attributes([catalog])
    row = {pid: i for i, pid in enumerate(items["product_id"])}
    labels = {column: sorted(set(items[column])) for column in ("master_category", "article_type", "colour", "usage",
                                                                  "gender")}
    certain = {column: label_posteriors(items[column].tolist(), values) for column, values in labels.items()}
    item_rows = np.array([[row[p] for p in shown] for shown in frame["items"]])
    scores = reader_scores(spec, frame["group_id"].tolist(), frame["brief"].tolist(), item_rows, certain, labels)

    # the simulator's probabilities are a softmax of utility / temperature: the same log-odds between shown items
    log_p = np.log(np.stack(frame["sim_probabilities"].to_numpy())[:, :-1])
    assert np.allclose(np.diff(scores, axis=1), np.diff(log_p, axis=1), atol=1e-6)
    assert frame["brief"].map(lambda b: named_colour(b, labels["colour"])).notna().mean() > 0.2  # bonus exercised

    # uncertain readings: expectations, so a 50/50 reading of two colours scores halfway
    halfway = {**certain, "colour": (certain["colour"] + np.roll(certain["colour"], 1, axis=1)) / 2}
    mixed = reader_scores(spec, frame["group_id"].tolist(), frame["brief"].tolist(), item_rows, halfway, labels)
    rolled = {**certain, "colour": np.roll(certain["colour"], 1, axis=1)}
    other = reader_scores(spec, frame["group_id"].tolist(), frame["brief"].tolist(), item_rows, rolled, labels)
    assert np.allclose(mixed, (scores + other) / 2)
