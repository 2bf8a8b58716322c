"""The reward model: save/load round trip, unknown groups fall back visibly, batched scoring = one at a time."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from genshop.embedding import EmbeddingConfig, load_embedder
from reward.groups import Group
from reward.model import RewardModel, RewardModelConfig
from reward.scoring import UnknownGroupWarning, load_scorer, score_embeddings, score_images

GROUPS = [Group(id="A", name="a", age_band="18-24", taste_tags=("sporty",)), Group(id="B", region="north")]


def tiny_model(embed_dim: int = 16, **fields) -> RewardModel:
    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig.for_groups(embed_dim, GROUPS, hidden_dim=8, deep_dim=16, **fields))
    with torch.no_grad():  # randomise everything so group differences are visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def unit(rows: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    model = tiny_model(embedding=EmbeddingConfig(backend="open_clip", model="/somewhere"), embedder_fingerprint="abc")
    images, brief = unit(5), unit(1, seed=1)[0]
    before = score_embeddings(model, images, brief, ["A", "B"])
    model.save_pretrained(tmp_path / "rm")
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == ["config.json", "model.safetensors"]
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    after = score_embeddings(loaded, images, brief, ["A", "B"])
    assert loaded.config == model.config
    for g in ("A", "B"):
        assert after[g].rewards == before[g].rewards
    assert before["A"].rewards != before["B"].rewards  # groups are scored differently
    assert sum(before["A"].probabilities) == pytest.approx(1.0)


def test_unknown_group_falls_back_to_the_population_visibly(caplog):
    model = tiny_model()
    images, brief = unit(4), unit(1, seed=2)[0]
    with pytest.warns(UnknownGroupWarning, match="'Z'"):
        scores = score_embeddings(model, images, brief, ["A", "Z"])
    assert "scored as the population" in caplog.text
    assert (scores["Z"].fallback, scores["Z"].scored_as) == (True, "population")
    assert (scores["A"].fallback, scores["A"].scored_as) == (False, "A")
    population = score_embeddings(model, images, brief, ["population"])["population"]
    assert scores["Z"].rewards == pytest.approx(population.rewards, rel=1e-4, abs=1e-4)  # BLAS kernels and thread counts differ in the last digits
    # the group-agnostic model reads every group as the population, without warnings
    agnostic = tiny_model(use_groups=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = score_embeddings(agnostic, images, brief, ["A", "B"])
    assert same["A"].rewards == same["B"].rewards


def test_score_images_batched_equals_one_at_a_time(open_clip_dir, tmp_path):
    embedding = EmbeddingConfig.for_directory(open_clip_dir, batch_size=4)
    model = tiny_model(embedding=embedding)
    model.save_pretrained(tmp_path / "rm")
    loaded, embedder = load_scorer(tmp_path / "rm")
    images = [Image.new("RGB", (60, 80), (25 * i, 200 - 20 * i, 90)) for i in range(7)]
    path = tmp_path / "img.png"
    images[3].save(path)
    batched = score_images(loaded, embedder, [*images[:3], path, *images[4:]], "red kurta for women", ["A", "B"])
    for i, image in enumerate(images):
        single = score_images(loaded, embedder, [image], "red kurta for women", ["A", "B"])
        for g in ("A", "B"):
            assert single[g].rewards[0] == pytest.approx(batched[g].rewards[i], abs=1e-4)
    assert len(batched["A"].rewards) == 7
    # the same model loads and scores with an embedder built by the caller
    direct = score_images(loaded, load_embedder(embedding), images[:2], "red kurta for women", ["B"])
    assert direct["B"].rewards == pytest.approx(batched["B"].rewards[:2], rel=1e-4, abs=1e-4)
