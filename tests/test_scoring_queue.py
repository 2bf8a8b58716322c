"""Workers score every generated image for every target group of its brief, on the score queue."""

from __future__ import annotations

from genshop.embedding import EmbeddingConfig
from tests.conftest import cli_json, cli_json_here, make_env, wait_for, write_brief
from tests.test_reward_model import tiny_model


def test_a_generated_brief_is_scored_for_each_target_group(tmp_path, models_dir, open_clip_dir, start_worker):
    reward_dir = tiny_model(embedding=EmbeddingConfig(backend="open_clip", model=str(open_clip_dir))).save_pretrained(
        tmp_path / "reward")
    env = make_env(tmp_path / "home", models_dir, GENSHOP_REWARD_MODEL=str(reward_dir),
                   GENSHOP_SCORE_QUEUE=f"score-{tmp_path.name[-12:]}")
    start_worker(env)
    submitted = cli_json(["submit", str(write_brief(tmp_path / "b.json", variants=3, groups=["A", "Z"])), "--json",
                          "--wait"], env)
    assert submitted["status"] == "succeeded"

    def scored():
        results = cli_json_here(["results", submitted["brief_id"], "--json"], env)
        return all(len(item["scores"]) == 2 for item in results["items"]) and results
    results = wait_for(scored, 60, 0.5, what="scores for groups A and Z")
    for item in results["items"]:
        by_group = {s["group_id"]: s for s in item["scores"]}
        assert by_group["A"]["population_fallback"] is False and by_group["Z"]["population_fallback"] is True
        assert by_group["A"]["reward_model"].startswith("reward@")
    assert len({item["scores"][0]["score"] for item in results["items"]}) == 3  # different images, different rewards


def test_submit_local_scores_in_process_like_the_workers(env, tmp_path, open_clip_dir):
    reward_dir = tiny_model(embedding=EmbeddingConfig(backend="open_clip", model=str(open_clip_dir))).save_pretrained(
        tmp_path / "reward")
    env = {**env, "GENSHOP_REWARD_MODEL": str(reward_dir)}
    submitted = cli_json_here(["submit", str(write_brief(tmp_path / "b.json", variants=2, groups=["A", "B"])),
                               "--local", "--json"], env)
    results = cli_json_here(["results", submitted["brief_id"], "--json"], env)
    assert [sorted(s["group_id"] for s in item["scores"]) for item in results["items"]] == [["A", "B"], ["A", "B"]]
