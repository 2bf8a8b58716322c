"""Best-of-N serving: every variant's N candidates in one batched pipeline call, each variant
keeping its target group's top by the (tiny, real) reward model, with its rank and the
candidates' seeds and scores recorded."""

from __future__ import annotations

import numpy as np
import pytest

from genshop.briefs import parse_brief, resolve_brief
from genshop.embedding import EmbeddingConfig
from genshop.generation import candidate_seed, generate_batch, plan_batches, reward_scorer, variant_seed
from genshop.presets import load_preset
from tests.test_reward_model import tiny_model


def test_best_of_n_makes_all_candidates_in_one_call_and_keeps_each_groups_top(env, tmp_path, open_clip_dir):
    from genshop.pipelines import load_pipeline

    loaded = load_pipeline("tiny-random")
    reward_dir = tiny_model(embedding=EmbeddingConfig(backend="open_clip", model=str(open_clip_dir))).save_pretrained(
        tmp_path / "reward")
    scorer = reward_scorer(reward_dir)
    preset = load_preset("tiny-random")
    brief = resolve_brief(parse_brief({"title": "Red kurta", "variants": 2, "best_of": 3, "seed": 5, "steps": 2,
                                       "groups": ["A", "B"]}), preset)
    batch_sizes = []
    hook = loaded.family.denoiser(loaded.pipeline).register_forward_hook(
        lambda module, args, kwargs, output: batch_sizes.append(
            (kwargs.get("sample") if kwargs.get("sample") is not None else args[0]).shape[0]), with_kwargs=True)
    kept = generate_batch(loaded, brief, [0, 1], scorer=scorer)
    hook.remove()
    assert len(batch_sizes) == 2 and len(set(batch_sizes)) == 1 and batch_sizes[0] % 6 == 0  # one call, 6 candidates
    assert [k.variant for k in kept] == [0, 1]
    for generated, group in zip(kept, ["A", "B"]):
        record = generated.best_of
        assert record["n"] == 3 and record["group"] == group and record["rank"] == 1
        assert record["seeds"] == [candidate_seed(brief.seed, generated.variant, c) for c in range(3)]
        assert record["seeds"][0] == variant_seed(brief.seed, generated.variant)  # candidate 0: the usual image
        assert record["kept"] == int(np.argmax(record["scores"])) and generated.seed == record["seeds"][record["kept"]]
        assert sorted(record["ranks"]) == [1, 2, 3] and record["ranks"][record["kept"]] == 1
        assert scorer([generated.image], generated.prompt, brief, group)[0] == pytest.approx(max(record["scores"]), abs=1e-4)
        assert generated.timings["candidates"] == 3.0
    with pytest.raises(ValueError, match="reward model"):
        generate_batch(loaded, brief, [0])

    plain = resolve_brief(parse_brief({"title": "Red kurta", "variants": 2, "seed": 5, "steps": 2}), preset)
    images = generate_batch(loaded, plain, [0, 1])
    assert [g.seed for g in images] == [variant_seed(5, 0), variant_seed(5, 1)] and images[0].best_of is None


def test_best_of_n_batches_bound_the_candidates_per_call():
    brief = parse_brief({"title": "A", "variants": 5, "best_of": 4})
    assert plan_batches(brief, 8) == [(None, [0, 1]), (None, [2, 3]), (None, [4])]
    assert plan_batches(parse_brief({"title": "A", "variants": 2, "best_of": 16}), 8) == [(None, [0]), (None, [1])]
    assert plan_batches(parse_brief({"title": "A", "variants": 3}), 8) == [(None, [0, 1, 2])]


def test_a_best_of_n_brief_runs_through_the_service_records_the_pick_and_exports_as_its_own_arm(
        tmp_path, env, monkeypatch, open_clip_dir):
    from genshop.experiments.export import ExportConfig, export_ab, listing_id
    from genshop.experiments.manifest import parse_arms
    from genshop.pipelines import load_pipeline
    from genshop.service import item_details, run_brief, submit_brief
    from genshop.settings import get_settings
    from genshop.store import Store

    reward_dir = tiny_model(embedding=EmbeddingConfig(backend="open_clip", model=str(open_clip_dir))).save_pretrained(
        tmp_path / "reward")
    monkeypatch.setenv("GENSHOP_REWARD_MODEL", str(reward_dir))
    get_settings.cache_clear()
    store = Store(f"sqlite:///{tmp_path / 'g.db'}", tmp_path / "files")
    record, _ = submit_brief(store, parse_brief({"title": "Red kurta", "variants": 2, "best_of": 3, "seed": 7,
                                                 "steps": 2, "groups": ["A"]}), "tiny-random")
    loaded = load_pipeline("tiny-random")
    finished = run_brief(store, record.id, loaded, max_attempts=2)
    items = store.list_items(record.id)
    assert finished.status == "succeeded" and [i.variant for i in items] == [0, 1]
    for item in items:
        scores = [item.timings[f"best_of_score_{c}"] for c in range(3)]
        kept = int(item.timings["best_of_kept"])
        assert item.timings["best_of_n"] == 3 and item.timings["best_of_rank"] == 1
        assert kept == int(np.argmax(scores)) and item.seed == candidate_seed(7, item.variant, kept)
    for details in item_details(store, record.id):  # what the gallery shows: rank and every candidate's score
        assert details.best_of.n == 3 and details.best_of.rank == 1
        assert details.best_of.scores == [details.timings[f"best_of_score_{c}"] for c in range(3)]
        assert details.best_of.scores[details.best_of.kept] == max(details.best_of.scores)

    plain, _ = submit_brief(store, parse_brief({"title": "Red kurta", "variants": 2, "seed": 7, "steps": 2,
                                                "groups": ["A"]}), "tiny-random")
    run_brief(store, plain.id, loaded, max_attempts=2)
    assert item_details(store, plain.id)[0].best_of is None
    manifest = export_ab(store, ExportConfig(out=tmp_path / "exp", arms=parse_arms(
        "base=preset:tiny-random,best=best-of:3,all=generated"), briefs=[record.id, plain.id], salt="s"))
    expected = {listing_id(arm, brief_id, item.id): arm for arm, brief_ids in
                (("base", [plain.id]), ("best", [record.id]), ("all", [record.id, plain.id]))
                for brief_id in brief_ids for item in store.list_items(brief_id)}
    assert {lid: item.arm for lid, item in manifest.items.items()} == expected  # base: single samples only
    with pytest.raises(ValueError, match="selector"):
        parse_arms("base=generated,best=best-of:17")

