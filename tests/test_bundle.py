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
