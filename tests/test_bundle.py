"""The shipped genshop-mini bundle: the generator loads with plain diffusers and draws what it is asked for."""

from __future__ import annotations

from collections import Counter

import torch

from genshop.evaluation.judge import JudgeModel, judge_images, to_pixels
from genshop.settings import BUNDLE_DIR

WALLET_LIKE = {"Wallets", "Clutches", "Handbags"}


def test_a_black_leather_wallet_from_the_bundle_is_judged_a_wallet_like_accessory():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    pipeline = StableDiffusionPipeline.from_pretrained(BUNDLE_DIR / "pipeline", safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    images = pipeline(["Men Black Leather Wallet"] * 4, num_inference_steps=20, guidance_scale=4.0, width=72,
                      height=96, generator=generators).images
    judge = JudgeModel.from_pretrained(BUNDLE_DIR / "judge")
    judged, _ = judge_images(judge, to_pixels(images, judge.config.width, judge.config.height))
    assert Counter(judged["master_category"]).most_common(1)[0][0] == "Accessories", judged
    assert sum(article in WALLET_LIKE for article in judged["article_type"]) >= 3, judged
    assert sum(colour == "Black" for colour in judged["colour"]) >= 3, judged


def test_the_bundle_ships_at_most_one_mini_lora_per_group_and_stays_within_60_mib():
    import json

    from genshop.adapters import ADAPTER_RECORD, LORA_WEIGHTS, available_adapters
    from reward.groups import load_groups
    from genshop.settings import REPO_ROOT

    shipped = available_adapters(BUNDLE_DIR / "adapters", "genshop/assets/genshop-mini/pipeline")
    assert set(shipped) == {"A", "B", "C"}  # the groups whose LoRA passed tune eval (README: Preference tuning)
    assert set(shipped) <= {g.id for g in load_groups(REPO_ROOT / "configs" / "groups.yaml")}
    assert sorted(p.name for p in (BUNDLE_DIR / "adapters").iterdir()) == sorted(shipped)  # nothing beside them
    for group, folder in shipped.items():
        assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_RECORD, LORA_WEIGHTS])
        assert json.loads((folder / ADAPTER_RECORD).read_text())["group"] == group
    assert sum(p.stat().st_size for p in BUNDLE_DIR.rglob("*") if p.is_file()) <= 60 * 2**20


def test_the_bundles_attribute_reward_knows_each_groups_taste_and_keeps_best_of_n_by_default(tmp_path, monkeypatch):
    from scipy.stats import spearmanr

    from genshop.settings import REPO_ROOT, get_settings
    from reward.attribute_reward import AttributeReward
    from reward.simulator import catalog_attributes, item_utilities, load_simulator_spec
    from reward.synthetic import write_synthetic_catalog

    reward = AttributeReward.from_pretrained(BUNDLE_DIR / "attribute-reward")
    spec = load_simulator_spec(REPO_ROOT / "configs" / "groups.yaml")
    items = catalog_attributes([write_synthetic_catalog(tmp_path / "catalog.parquet", 300, seed=4)])
    truth, learned = item_utilities(spec, items), reward.utilities(items)
    assert reward.config.groups == list(spec.groups) and reward.config.reader == "top-tuned"
    for g, group in enumerate(spec.groups):
        assert spearmanr(truth[g], learned[g]).statistic > 0.9, group
    for name in ("GENSHOP_REWARD_MODEL", "GENSHOP_EMBEDDING_MODEL", "GENSHOP_UNDERSTANDING", "GENSHOP_BEST_OF_REWARD"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        assert get_settings().best_of_reward == BUNDLE_DIR / "attribute-reward"  # the bundle's models throughout
        monkeypatch.setenv("GENSHOP_REWARD_MODEL", str(tmp_path / "shop-reward"))
        get_settings.cache_clear()
        assert get_settings().best_of_reward == tmp_path / "shop-reward"  # a shop's own reward model keeps them
        monkeypatch.setenv("GENSHOP_BEST_OF_REWARD", str(tmp_path / "other"))
        get_settings.cache_clear()
        assert get_settings().best_of_reward == tmp_path / "other"
    finally:
        get_settings.cache_clear()
