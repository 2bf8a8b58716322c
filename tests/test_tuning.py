"""Preference tuning: the objectives against their formulas, and a real (tiny) tuning run whose
LoRA plain diffusers loads, that resumes where it stopped."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from genshop.embedding import EmbeddingConfig
from genshop.tuning.losses import diffusion_dpo_loss, plackett_luce_loss, preference_loss
from tests.conftest import cli_json, make_env, run_cli
from tests.test_reward_model import tiny_model


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_is_the_papers_formula():
    torch.manual_seed(0)
    policy, reference = torch.rand(5, 2), torch.rand(5, 2)
    beta = 3.0
    loss, accuracy = diffusion_dpo_loss(policy, reference, beta)
    terms, wins = [], 0
    for (pw, pl), (rw, rl) in zip(policy.tolist(), reference.tolist()):
        inside = -0.5 * beta * ((pw - pl) - (rw - rl))
        terms.append(-_log_sigmoid(inside))
        wins += inside > 0
    assert loss.item() == pytest.approx(sum(terms) / 5, rel=1e-5)
    assert accuracy.item() == pytest.approx(wins / 5)


def test_plackett_luce_loss_is_the_ranking_likelihood_and_dpo_for_two():
    torch.manual_seed(1)
    policy, reference = torch.rand(3, 4), torch.rand(3, 4)
    beta = 2.0
    loss, accuracy = plackett_luce_loss(policy, reference, beta)
    expected, agree, pairs = 0.0, 0, 0
    for p_row, r_row in zip(policy.tolist(), reference.tolist()):
        r = [-0.5 * beta * (p - q) for p, q in zip(p_row, r_row)]
        expected -= sum(r[i] - math.log(sum(math.exp(x) for x in r[i:])) for i in range(len(r) - 1))
        for i in range(4):
            for j in range(i + 1, 4):
                agree += r[i] > r[j]
                pairs += 1
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)
    assert accuracy.item() == pytest.approx(agree / pairs)
    pair_policy, pair_reference = policy[:, [0, 3]], reference[:, [0, 3]]
    assert plackett_luce_loss(pair_policy, pair_reference, beta)[0].item() == pytest.approx(
        diffusion_dpo_loss(pair_policy, pair_reference, beta)[0].item(), rel=1e-6)
    assert preference_loss("dpo", policy, reference, beta)[0].item() == pytest.approx(
        diffusion_dpo_loss(pair_policy, pair_reference, beta)[0].item(), rel=1e-6)


def test_a_tuning_run_saves_a_diffusers_lora_and_resumes(tmp_path, models_dir, open_clip_dir):
    env = make_env(tmp_path / "home", models_dir)
    reward_dir = tiny_model(embedding=EmbeddingConfig(backend="open_clip", model=str(open_clip_dir))).save_pretrained(
        tmp_path / "reward")
    briefs = tmp_path / "briefs.yaml"
    briefs.write_text(json.dumps([
        {"title": "Women's red kurta", "article_type": "Kurtas", "colour": "Red", "usage": "Ethnic", "seed": 1},
        {"title": "Men's black wallet", "article_type": "Wallets", "colour": "Black", "seed": 2}]))
    out = tmp_path / "tune-A"
    args = ["tune", "--group", "A", "--briefs", str(briefs), "--reward", str(reward_dir), "--out", str(out),
            "--candidates", "3", "--steps", "3", "--inference-steps", "2", "--lr", "1e-2", "--threads", "1",
            "--objective", "listwise"]
    first = run_cli([*args, "--rounds", "1"], env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli([*args, "--rounds", "2"], env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once: round 2 resumed
    assert [r["round"] for r in log if r.get("event") == "rankings"] == [0, 1]
    assert all(r["rankings"] == 2 for r in log if r.get("event") == "rankings")
    for name in ("curves.png", "samples-before.png", "samples-after.png"):
        assert (out / name).stat().st_size > 1000
    assert json.loads((out / "adapter" / "genshop_adapter.json").read_text())["steps"] == 6

    # plain diffusers, in a process that never imports genshop, loads the LoRA and it changes the images
    pipeline_dir = next(models_dir.glob("tiny-random-*"))
    script = f"""
import sys, numpy as np, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(pipeline_dir)!r}, safety_checker=None)
def run():
    return np.asarray(pipe("Women's red kurta", num_inference_steps=2, width=32, height=32,
                           generator=torch.Generator().manual_seed(0)).images[0], dtype=float)
base = run()
pipe.load_lora_weights({str(out / 'adapter')!r}, adapter_name="group_A")
tuned = run()
assert not any(m.startswith("genshop") for m in sys.modules)
print(np.abs(tuned - base).mean())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) > 0.0

    # tuned vs base on held-out briefs: win rates, the judge's fidelity, CLIP diversity
    evaluated = run_cli(["tune", "eval", "--group", "A", "--adapter", str(out / "adapter"), "--briefs", str(briefs),
                         "--reward", str(reward_dir), "--variants", "2", "--inference-steps", "2", "--json",
                         str(tmp_path / "eval.json"), "--grid", str(tmp_path / "eval.png")], env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["briefs"] == 2 and 0 <= report["reward_win_rate"] <= 1 and 0 <= report["heldout_win_rate"] <= 1
    assert set(report["fidelity_base"]) == {"article_type", "colour", "master_category"}
    assert report["diversity_base"] > 0 and set(report["passed"]) == {"heldout_win_rate", "fidelity", "diversity"}
    assert (tmp_path / "eval.png").stat().st_size > 1000

    # workers switch the group's LoRA in on the one loaded pipeline: group A's variants tuned, group B's base
    shutil.copytree(out / "adapter", tmp_path / "home" / "adapters" / "A")
    for name, groups in (("grouped", ["A", "B"]), ("plain", [])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"title": "Women's red kurta", "variants": 2, "seed": 4,
                                                            "groups": groups}))
    grouped = cli_json(["submit", str(tmp_path / "grouped.json"), "--local", "--json"], env)
    plain = cli_json(["submit", str(tmp_path / "plain.json"), "--local", "--json"], env)
    grouped_items = cli_json(["results", grouped["brief_id"], "--json"], env)["items"]
    plain_items = cli_json(["results", plain["brief_id"], "--json"], env)["items"]
    assert grouped_items[0]["model_id"].endswith("+lora:A") and "+lora" not in grouped_items[1]["model_id"]
    assert grouped_items[0]["image_sha256"] != plain_items[0]["image_sha256"]  # same seed, the LoRA changed it
    assert grouped_items[1]["image_sha256"] == plain_items[1]["image_sha256"]  # group B: the base model


def test_target_groups_take_turns_and_a_tuned_group_gets_its_lora():
    from genshop.briefs import parse_brief
    from genshop.generation import plan_batches, variant_group

    brief = parse_brief({"title": "Red kurta", "variants": 5, "groups": ["A", "B"]})
    assert [variant_group(brief, v) for v in range(5)] == ["A", "B", "A", "B", "A"]
    assert plan_batches(brief, 2) == [(None, [0, 1]), (None, [2, 3]), (None, [4])]
    assert plan_batches(brief, 2, frozenset({"A"})) == [("A", [0, 2]), ("A", [4]), (None, [1, 3])]


def test_win_rate_counts_ties_half_and_diversity_is_mean_pairwise_cosine_distance():
    import numpy as np

    from genshop.tuning.evaluation import mean_pairwise_distance, win_rate

    assert win_rate(np.array([1.0, 2.0, 3.0, 0.0]), np.array([0.0, 2.0, 1.0, 1.0])) == pytest.approx((1 + 0.5 + 1) / 4)
    e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert mean_pairwise_distance(e) == pytest.approx((1 + 0 + 1) / 3)
