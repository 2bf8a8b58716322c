"""Domain CLIP: training on a tiny synthetic catalog, resuming, text-tower export, evaluation metrics, CLI."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from genshop.catalog_data import attribute_phrases, listing_text, sample_caption
from genshop.evaluation.clip_eval import (
    accuracy,
    retrieval_metrics,
    retrieval_ranks,
    weighted_f1,
    label_log_prior,
    zero_shot_classifier,
    zero_shot_predict,
)
from genshop.training.clip import CatalogBatches, ClipTrainingConfig, train_clip
from genshop.run_log import read_log

TINY_ARCHITECTURE = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "longest",
                       "fill_color": 255},
}
COLOURS = {"Red": (210, 30, 30), "Green": (30, 170, 40), "Blue": (30, 50, 210), "Black": (15, 15, 15)}
ARTICLES = {"Tshirts": ("Apparel", "Topwear"), "Casual Shoes": ("Footwear", "Shoes"), "Watches": ("Accessories", "Watches")}


def product_image(colour: str, article: str) -> bytes:
    image = Image.new("RGB", (60, 80), "white")
    draw = ImageDraw.Draw(image)
    box = {"Tshirts": (10, 10, 50, 70), "Casual Shoes": (5, 45, 55, 65), "Watches": (20, 25, 40, 55)}[article]
    (draw.ellipse if article == "Watches" else draw.rectangle)(box, fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_catalog(path, rows_per_pair: int = 4) -> pd.DataFrame:
    rng = random.Random(0)
    rows = []
    for colour in COLOURS:
        for article, (master, sub) in ARTICLES.items():
            for k in range(rows_per_pair):
                gender = rng.choice(["Men", "Women"])
                rows.append({"product_id": f"{len(rows)}", "title": f"Brand{k} {gender} {colour} {article}",
                             "gender": gender, "master_category": master, "sub_category": sub, "article_type": article,
                             "colour": colour, "usage": "Casual", "image": product_image(colour, article)})
    frame = pd.DataFrame(rows)
    frame.to_parquet(path)
    return frame


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog")
    architecture = folder / "tiny-clip.json"
    architecture.write_text(json.dumps(TINY_ARCHITECTURE))
    path = folder / "catalog.parquet"
    write_catalog(path)
    return path, architecture


def tiny_config(catalog, out_dir, **overrides) -> ClipTrainingConfig:
    path, architecture = catalog
    fields = {"data": [path], "out_dir": out_dir, "architecture": architecture, "batch_size": 16, "max_steps": 12,
              "learning_rate": 3e-3, "warmup_steps": 2, "log_every": 1, "checkpoint_every": 4,
              "mixed_precision": "no", "save_dtype": "float32", "threads": 1, **overrides}
    return ClipTrainingConfig(**fields)


# ---------------------------------------------------------------- listing texts

def test_listing_text_is_the_title_plus_attribute_phrases():
    row = {"title": "Nike Men Blue Tshirts", "gender": "Men", "master_category": "Apparel", "sub_category": "Topwear",
           "article_type": "Tshirts", "colour": "Blue", "usage": "Sports"}
    assert listing_text(row) == "Nike Men Blue Tshirts. Tshirts, Topwear, Apparel, Blue colour, for Men, Sports wear"
    assert "for Unknown" not in " ".join(attribute_phrases({**row, "gender": "Unknown"}))
    captions = {sample_caption(row, random.Random(seed)) for seed in range(50)}
    assert "Nike Men Blue Tshirts" in captions  # bare titles
    assert any(c.startswith("Nike Men Blue Tshirts. ") for c in captions)  # title + phrases
    assert any("Nike" not in c for c in captions)  # taxonomy-only captions


def test_attribute_view_gives_every_image_a_second_taxonomy_only_caption(catalog, tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from genshop.catalog_data import read_catalog, rows_as_dicts

    frame = read_catalog([catalog[0]])
    images = torch.zeros(len(frame), 3, 32, 32, dtype=torch.uint8)
    tokenizer = SimpleTokenizer(context_length=24)
    config = tiny_config(catalog, tmp_path, attribute_view=True, title_only=1.0)
    pixels, tokens = CatalogBatches(images, rows_as_dicts(frame), config, TINY_ARCHITECTURE["preprocess_cfg"],
                                    tokenizer)(0)
    assert len(tokens) == 2 * len(pixels) == 32
    captions = [tokenizer.decode(row[row > 0].tolist()) for row in tokens]
    assert all("brand" in caption for caption in captions[:16])  # view 1: the titles (title_only=1)
    assert not any("brand" in caption for caption in captions[16:])  # view 2: taxonomy only


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(catalog, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    progress = []
    model_dir = train_clip(tiny_config(catalog, out_dir, max_steps=40, checkpoint_every=20, attribute_view=True),
                           progress.append)
    return out_dir, model_dir, progress


def test_training_reduces_the_loss_and_writes_the_run_folder(trained):
    out_dir, model_dir, progress = trained
    losses = [r["loss"] for r in read_log(out_dir / "log.jsonl") if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert [p.step for p in progress if p.loss is not None] == list(range(1, 41))
    for name in ("model/open_clip_config.json", "model/open_clip_model.safetensors", "loss.png",
                 "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                 "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors", "train_config.json"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_at_the_saved_step_and_matches_an_uninterrupted_run(catalog, tmp_path):
    straight = train_clip(tiny_config(catalog, tmp_path / "straight"))

    class Interrupt(Exception):
        pass

    def stop_at_step_6(p):
        if p.step == 6 and p.loss is not None:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_clip(tiny_config(catalog, tmp_path / "resumed"), stop_at_step_6)
    assert json.loads((tmp_path / "resumed/checkpoint/state.json").read_text())["step"] == 4
    steps = []
    resumed = train_clip(tiny_config(catalog, tmp_path / "resumed"), lambda p: steps.append(p.step) if p.loss else None)
    assert steps == list(range(5, 13))
    assert [r["step"] for r in read_log(tmp_path / "resumed/log.jsonl") if "loss" in r] == list(range(1, 13))
    a, b = load_file(straight / "open_clip_model.safetensors"), load_file(resumed / "open_clip_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_trained_model_loads_through_the_embedding_interface_and_its_text_tower_exports(trained):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from genshop.embedding import EmbeddingConfig, load_embedder

    out_dir, model_dir, _ = trained
    embedder = load_embedder(EmbeddingConfig.for_directory(model_dir))
    texts = ["Brand1 Men Red Tshirts", "a photo of casual shoes"]
    expected = embedder.embed_texts(texts)
    assert expected.shape == (2, 32)

    text_encoder = CLIPTextModelWithProjection.from_pretrained(out_dir / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    assert tokenizer.model_max_length == text_encoder.config.max_position_embeddings == 24
    tokens = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        exported = torch.nn.functional.normalize(text_encoder(input_ids=tokens.input_ids).text_embeds, dim=-1).numpy()
    np.testing.assert_allclose(exported, expected, atol=2e-3)  # the run saved its CLIP in float32 here


# ---------------------------------------------------------------- evaluation

def test_weighted_f1_and_accuracy_on_a_worked_example():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    # a: P=1 R=2/3 F1=0.8 (3) ; b: P=1/2 R=1/2 F1=0.5 (2) ; c: P=1/2 R=1 F1=2/3 (1)
    assert weighted_f1(y_true, y_pred) == pytest.approx((0.8 * 3 + 0.5 * 2 + (2 / 3) * 1) / 6)
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert weighted_f1(["x"], ["y"]) == 0.0


def test_retrieval_ranks_and_metrics_on_constructed_embeddings():
    gallery = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 0.2, 0.8], [0, 0, 0, 1]], dtype=np.float32)
    ranks = retrieval_ranks(queries, gallery)
    assert ranks.tolist() == [1, 2, 2, 1]
    metrics = retrieval_metrics(ranks)
    assert metrics["retrieval_r@1"] == 0.5 and metrics["retrieval_r@10"] == 1.0
    assert metrics["retrieval_mrr"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    # queries 1 and 2 share a title with query 0 and 3: their images count as right answers too
    relevant = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    assert retrieval_ranks(queries, gallery, relevant).tolist() == [1, 1, 1, 1]
    relevant = np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    assert retrieval_ranks(queries, gallery, relevant).tolist() == [1, 2, 2, 1]


def test_zero_shot_averages_the_prompt_ensemble_in_embedding_space():
    class FakeEmbedder:
        def embed_texts(self, texts):
            vectors = {"cat": [1.0, 0.0], "dog": [0.0, 1.0]}
            out = np.array([vectors[t.split()[-1]] if "photo" in t else [0.6, 0.8] for t in texts], dtype=np.float32)
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    classes = zero_shot_classifier(FakeEmbedder(), ["cat", "dog"], ["a photo of {}", "{}"])
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(classes[0], np.array([1.6, 0.8]) / np.linalg.norm([1.6, 0.8]), atol=1e-6)
    assert zero_shot_predict(np.array([[0.9, 0.1], [0.1, 0.9]]), classes, ["cat", "dog"]) == ["cat", "dog"]


def test_label_prior_is_bayes_rule_on_the_logits():
    log_prior = label_log_prior(["dog"] * 8 + ["cat"] * 1, ["cat", "dog", "owl"])
    np.testing.assert_allclose(np.exp(log_prior), [2 / 12, 9 / 12, 1 / 12])  # add-one smoothing
    classes = np.eye(2)
    image = np.array([[0.52, 0.48]])  # a little closer to "cat"
    assert zero_shot_predict(image, classes, ["cat", "dog"]) == ["cat"]
    # at logit scale 10 the cat's lead is 0.4 nats; the prior favours dog by log(9/2) = 1.5 nats
    assert zero_shot_predict(image, classes, ["cat", "dog"], 10.0, label_log_prior(["dog"] * 8 + ["cat"], ["cat", "dog"])) == ["dog"]
    assert zero_shot_predict(image, classes, ["cat", "dog"], 100.0, label_log_prior(["dog"] * 8 + ["cat"], ["cat", "dog"])) == ["cat"]


def test_cli_trains_then_evaluates_and_writes_the_report(catalog, tmp_path):
    from genshop.cli_train import eval_clip
    from genshop.cli_train import train_clip as train_command

    path, architecture = catalog
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"batch_size": 16, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 10,
                                  "mixed_precision": "no", "learning_rate": 3e-3}))
    runner = CliRunner()
    result = runner.invoke(train_command, ["--data", str(path), "--out", str(tmp_path / "run"), "--config", str(recipe),
                                           "--architecture", str(architecture), "--max-steps", "6", "--threads", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(eval_clip, ["--model", str(tmp_path / "run/model"), "--data", str(path),
                                       "--prior-data", str(path), "--json-out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["rows"] == 48 and report["backend"] == "open_clip"
    for name in ("master_category_accuracy", "article_type_accuracy", "article_type_weighted_f1", "colour_accuracy",
                 "colour_accuracy_no_prior", "master_category_accuracy_no_prior", "retrieval_r@1", "retrieval_r@10",
                 "retrieval_mrr"):
        assert 0.0 <= report["metrics"][name] <= 1.0, name
        assert name in result.output
