"""Training: a group model beats a group-agnostic one where groups disagree; held-out items stay held out;
the CLI runs simulate → train → eval → score end to end on a tiny random CLIP."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from genshop.settings import REPO_ROOT
from reward.evaluation import RewardEvalConfig, evaluate_reward
from reward.impressions import read_impressions, write_impressions
from reward.simulator import SimulationConfig, simulate_impressions
from reward.splits import is_held_out
from reward.synthetic import SyntheticFeatures, write_synthetic_catalog
from reward.training import TRAINING_ITEMS, RewardArchitecture, RewardTrainingConfig, train_reward

GROUPS = REPO_ROOT / "configs" / "groups.yaml"
SMALL = RewardArchitecture(hidden_dim=32, cross_layers=2, deep_layers=1, deep_dim=64, dropout=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Group and group-agnostic models trained on impressions of one synthetic catalog, eval data from another."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train")
    train_catalog = write_synthetic_catalog(root / "train.parquet", 600, seed=1)
    eval_catalog = write_synthetic_catalog(root / "eval.parquet", 200, seed=2, id_offset=10_000)
    features = SyntheticFeatures([train_catalog, eval_catalog], dim=32, noise=0.05)
    frame, _ = simulate_impressions(SimulationConfig(catalog=[train_catalog], groups=GROUPS, n=8000, k=4, seed=1))
    write_impressions(frame, root / "train-imp.parquet")
    frame, report = simulate_impressions(SimulationConfig(catalog=[eval_catalog], groups=GROUPS, n=3000, k=4, seed=2))
    write_impressions(frame, root / "eval-imp.parquet")
    runs = {}
    for name, use_groups in (("group", True), ("agnostic", False)):
        config = RewardTrainingConfig(impressions=[root / "train-imp.parquet"], groups=GROUPS, out_dir=root / name,
                                      architecture=SMALL, use_groups=use_groups, max_epochs=12, patience=3,
                                      batch_size=128, learning_rate=3e-3, warmup_steps=20, log_every=20,
                                      holdout_fraction=0.2, threads=1)
        runs[name] = train_reward(config, features=features)
    evaluation = evaluate_reward(RewardEvalConfig(model=runs["group"], baseline=runs["agnostic"],
                                                  impressions=[root / "eval-imp.parquet"]), features=features)
    return root, runs, evaluation, report


def test_group_model_beats_group_agnostic_where_groups_disagree(trained):
    _, _, evaluation, simulation = trained
    group, agnostic, bayes = (evaluation.models[m] for m in ("group", "group_agnostic", "bayes"))
    # measured when written: gaps 0.32 and 0.40, 0.97 of Bayes-optimal
    assert group.accuracy_disagree_any - agnostic.accuracy_disagree_any >= 0.2, evaluation.measured
    assert group.accuracy_disagree_population - agnostic.accuracy_disagree_population >= 0.25, evaluation.measured
    assert group.bayes_fraction >= 0.9, evaluation.models
    assert group.log_loss < agnostic.log_loss < evaluation.models["clip"].log_loss + 1.0
    assert bayes.bayes_fraction == pytest.approx(1.0)
    assert set(group.accuracy_by_group) == {"A", "B", "C", "D"}
    assert 0 <= group.calibration_error < 0.1


def test_training_holds_out_items_and_writes_a_complete_run_folder(trained):
    root, runs, evaluation, _ = trained
    run = runs["group"].parent
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["model", "train_config.json", "log.jsonl", "curves.png", TRAINING_ITEMS])
    trained_items = set((run / TRAINING_ITEMS).read_text().split())
    assert trained_items and not any(is_held_out(item, 0.2) for item in trained_items)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    start = log[0]
    assert start["held_out_impressions"] > 0 and start["train_impressions"] > 0
    assert any("val_accuracy" in r for r in log) and log[-1]["event"] == "best"
    assert evaluation.items_seen_in_training == 0  # the eval catalog is disjoint


TINY_OPEN_CLIP = {
    "model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "longest",
                       "fill_color": 255},
}


def test_cli_simulate_train_eval_score_on_a_tiny_random_clip(tmp_path):
    import open_clip

    from genshop.cli_reward import reward, simulate
    from genshop.embedding import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

    torch.manual_seed(0)
    clip = tmp_path / "clip"
    clip.mkdir()
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**TINY_OPEN_CLIP["model_cfg"]).state_dict().items()},
              str(clip / OPEN_CLIP_WEIGHTS))
    (clip / OPEN_CLIP_CONFIG).write_text(json.dumps(TINY_OPEN_CLIP))
    catalog = write_synthetic_catalog(tmp_path / "catalog.parquet", 120, seed=3)
    runner = CliRunner()

    def ok(group, args):
        result = runner.invoke(group, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result.output

    ok(simulate, ["impressions", "--catalog", catalog, "--groups", GROUPS, "--n", 600, "--out", tmp_path / "imp.parquet"])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"architecture": {"hidden_dim": 8, "deep_dim": 16}, "max_epochs": 2,
                                  "holdout_fraction": 0.3, "threads": 1}))
    common = ["--impressions", tmp_path / "imp.parquet", "--catalog", catalog, "--clip", clip, "--groups", GROUPS,
              "--config", recipe]
    ok(reward, ["train", *common, "--out", tmp_path / "run"])
    ok(reward, ["train", *common, "--out", tmp_path / "agnostic", "--group-agnostic", "--loss", "mixed"])
    assert (tmp_path / "cache" / "reward-embeddings").is_dir()  # items embedded once, reused by the second run
    output = ok(reward, ["eval", tmp_path / "run" / "model", "--impressions", tmp_path / "imp.parquet",
                         "--catalog", catalog, "--baseline", tmp_path / "agnostic" / "model",
                         "--cache-dir", tmp_path / "cache" / "reward-embeddings"])
    assert "group_bayes_fraction" in output and "gap_disagree_any" in output
    report = json.loads((tmp_path / "run" / "eval-imp.json").read_text())
    assert {"group", "group_agnostic", "clip", "bayes"} <= set(report["models"])

    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (60, 80), (200, 20, 20)).save(image)
    Image.new("RGB", (60, 80), (20, 20, 20)).save(tmp_path / "black.png")
    output = ok(reward, ["score", image, tmp_path / "black.png", "--model", tmp_path / "run" / "model",
                         "--group", "A", "--group", "Q", "--brief", "red kurta", "--json"])
    scores = json.loads(output[output.index("{"):])
    assert len(scores["groups"]["A"]["rewards"]) == 2
    assert scores["groups"]["Q"]["fallback"] is True
    assert "scored as the population" in output
    assert len(read_impressions(tmp_path / "imp.parquet")) == 600
