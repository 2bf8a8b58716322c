"""The generator recipe on a tiny synthetic catalog: both stages run, resume, and save a plain SD folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from genshop.training.generator import GeneratorTrainingConfig, train_generator
from genshop.run_log import read_log
from tests.conftest import write_tiny_open_clip
from tests.test_clip_training import write_catalog

TINY_VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [8, 8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4}
TINY_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [16, 32],
             "layers_per_block": 1, "attention_head_dim": 8, "cross_attention_dim": 32, "norm_num_groups": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generator")
    write_catalog(folder / "catalog.parquet", rows_per_pair=2)
    write_tiny_open_clip(folder / "clip")
    (folder / "vae.json").write_text(json.dumps(TINY_VAE))
    (folder / "unet.json").write_text(json.dumps(TINY_UNET))
    return folder


def config(folder, out, **overrides) -> GeneratorTrainingConfig:
    return GeneratorTrainingConfig(**{
        "data": [str(folder / "catalog.parquet")], "clip": str(folder / "clip"), "out": str(out), "width": 24,
        "height": 32, "vae_config": str(folder / "vae.json"), "unet_config": str(folder / "unet.json"),
        "vae_steps": 4, "vae_batch_size": 8, "unet_steps": 4, "unet_batch_size": 8, "warmup_steps": 2,
        "checkpoint_every": 2, "sample_every": 4, "threads": 1, **overrides})


def test_both_stages_train_and_save_a_folder_plain_diffusers_loads(setup, tmp_path):
    seen = []
    pipeline_dir = train_generator(config(setup, tmp_path / "run"), lambda stage, step, total, m: seen.append((stage, step)))
    assert seen[0] == ("vae", 1) and seen[-1] == ("unet", 4)
    assert [r["step"] for r in read_log(tmp_path / "run" / "log-unet.jsonl")] == [1, 2, 3, 4]
    for png in ("loss-curves.png", "samples-step000004.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    assert not list(pipeline_dir.rglob("*.bin")) and list(pipeline_dir.rglob("*.safetensors"))
    code = ("import sys; from diffusers import StableDiffusionPipeline; "
            f"p = StableDiffusionPipeline.from_pretrained({str(pipeline_dir)!r}); "
            "im = p('Men Red Tshirts', num_inference_steps=2, width=24, height=32).images[0]; "
            "assert 'genshop' not in sys.modules; print(im.size)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(24, 32)")


def test_a_stopped_run_resumes_where_it_checkpointed(setup, tmp_path):
    train_generator(config(setup, tmp_path / "run", unet_steps=2))
    train_generator(config(setup, tmp_path / "run", unet_steps=4))
    assert [r["step"] for r in read_log(tmp_path / "run" / "log-unet.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_log(tmp_path / "run" / "log-vae.jsonl")] == [1, 2, 3, 4]


def test_generator_eval_grades_generated_images_with_the_judge(setup, tmp_path):
    from genshop.evaluation.generator_eval import GeneratorEvalConfig, evaluate_generator
    from genshop.evaluation.judge import JudgeTrainingConfig, train_judge

    pipeline_dir = train_generator(config(setup, tmp_path / "run"))
    judge_dir = train_judge(JudgeTrainingConfig(data=[str(setup / "catalog.parquet")], out=str(tmp_path / "judge"),
                                                epochs=1, batch_size=8, threads=1))
    report = evaluate_generator(GeneratorEvalConfig(
        pipeline=str(pipeline_dir), judge=str(judge_dir), data=[str(setup / "catalog.parquet")], samples=6, steps=2,
        width=24, height=32, batch_size=3, grid=str(tmp_path / "grid.png"), out=str(tmp_path / "generated")))
    assert report.split == "catalog"  # named from the data file, whatever split it holds
    assert report.samples == 6 and set(report.accuracy) == {"master_category", "article_type", "colour"}
    # every image a PNG, and a table another judge can score the same images from
    table = pd.read_parquet(tmp_path / "generated" / "images.parquet")
    assert len(table) == 6 and table["seed"].tolist() == list(range(6))
    assert {"image_path", "prompt", "expected_colour", "judged_colour"} <= set(table.columns)
    assert all(Image.open(path).size == (24, 32) for path in table["image_path"])
    assert pd.read_csv(tmp_path / "generated" / "images.csv")["prompt"].tolist() == table["prompt"].tolist()
    assert report.accuracy["colour"] == pytest.approx((table["expected_colour"] == table["judged_colour"]).mean())
    assert all(0.0 <= v <= 1.0 for v in report.accuracy.values())
    assert report.frechet_distance_judge >= 0 and (tmp_path / "grid.png").stat().st_size > 1000


def test_a_trained_vae_can_be_reused_instead_of_retrained(setup, tmp_path):
    train_generator(config(setup, tmp_path / "first", unet_steps=0))
    reused = train_generator(config(setup, tmp_path / "second", vae=str(tmp_path / "first" / "vae"), unet_steps=2))
    assert not (tmp_path / "second" / "log-vae.jsonl").exists()
    assert (reused / "vae" / "diffusion_pytorch_model.safetensors").is_file()
