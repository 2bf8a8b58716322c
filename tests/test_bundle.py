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
