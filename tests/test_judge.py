"""The evaluation judge: learns the synthetic catalog's categories and colours, round-trips, measures distance."""

from __future__ import annotations

import numpy as np

from genshop.catalog_data import decode_image
from genshop.evaluation.judge import JudgeModel, JudgeTrainingConfig, frechet_distance, judge_images, to_pixels, train_judge
from tests.test_clip_training import write_catalog


def test_judge_learns_categories_and_colours_and_round_trips(tmp_path):
    frame = write_catalog(tmp_path / "catalog.parquet", rows_per_pair=6)
    out = train_judge(JudgeTrainingConfig(data=[str(tmp_path / "catalog.parquet")], out=str(tmp_path / "judge"),
                                          epochs=12, batch_size=16, learning_rate=3e-3, threads=1))
    judge = JudgeModel.from_pretrained(out)
    pixels = to_pixels([decode_image(b) for b in frame["image"]], judge.config.width, judge.config.height)
    predictions, features = judge_images(judge, pixels)
    for column in ("master_category", "article_type", "colour"):
        accuracy = np.mean(np.array(predictions[column]) == frame[column].to_numpy())
        assert accuracy >= 0.9, (column, accuracy)
    again, _ = judge_images(JudgeModel.from_pretrained(out), pixels)
    assert again == predictions and features.shape == (len(frame), judge.config.channels[-1])


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 6))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert abs(frechet_distance(a, a + 1.0) - 6.0) < 0.05  # mean shift of 1 in 6 dimensions
