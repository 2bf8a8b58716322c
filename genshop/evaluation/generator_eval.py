"""Grade a text-to-image pipeline with the judge: does an image made from a catalog title show
the master category, article type and colour the listing has? And how far is the cloud
of generated images from the real photos (Fréchet distance in the judge's features)?

With ``out``, every generated image is written as a PNG beside a table (``images.parquet``
and ``images.csv``: image path, prompt, seed, expected labels, judged labels), so any other
judge can score the same images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from genshop.evaluation.judge import JUDGED, JudgeModel, frechet_distance, judge_images, to_pixels

ProgressCallback = Callable[[int, int], None]


class GeneratorEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(description="a StableDiffusionPipeline folder")
    judge: str
    data: list[str] = Field(description="catalog parquet files (the split graded, e.g. val or a further test split)")
    samples: int = Field(default=400, ge=1, description="val listings generated from, drawn with a fixed seed")
    width: int = Field(default=72, description="generation size (the generator's training size)")
    height: int = 96
    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 16
    seed: int = 0
    grid: str | None = Field(default=None, description="PNG of generated images beside the real photos")
    out: str | None = Field(default=None, description="folder for every generated PNG and the table of them")


def split_name(data: list[str]) -> str:
    """What the graded split is called: the data files' names (``catalog-test.parquet`` → ``catalog-test``)."""
    return "+".join(Path(path).stem for path in data)


class GeneratorEvalReport(BaseModel):
    split: str = Field(description="the data files graded, by name")
    samples: int
    accuracy: dict[str, float]
    judge_accuracy_on_real: dict[str, float]
    frechet_distance_judge: float
    frechet_distance_real_halves: float = Field(description="the same distance between two halves of the real photos: the floor")


def evaluate_generator(config: GeneratorEvalConfig, progress: ProgressCallback | None = None) -> GeneratorEvalReport:
    from diffusers import StableDiffusionPipeline

    from genshop.catalog_data import decode_image, read_catalog

    frame = read_catalog(config.data)
    rows = frame.sample(n=min(config.samples, len(frame)), random_state=config.seed)
    positions = rows.index.to_numpy()  # where each sampled listing's real photo sits in ``frame``
    rows = rows.reset_index(drop=True)
    pipeline = StableDiffusionPipeline.from_pretrained(config.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    judge = JudgeModel.from_pretrained(config.judge)

    generated, seeds = [], [config.seed + i for i in range(len(rows))]
    for start in range(0, len(rows), config.batch_size):
        titles = rows["title"].iloc[start:start + config.batch_size].tolist()
        generators = [torch.Generator().manual_seed(seeds[start + i]) for i in range(len(titles))]
        generated += pipeline(titles, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                              width=config.width, height=config.height, generator=generators).images
        if progress:
            progress(min(start + config.batch_size, len(rows)), len(rows))

    size = judge.config.width, judge.config.height
    predicted, generated_features = judge_images(judge, to_pixels(generated, *size))
    real_images = [decode_image(b) for b in frame["image"]]
    real_predicted, real_features = judge_images(judge, to_pixels(real_images, *size))
    half = len(real_features) // 2
    report = GeneratorEvalReport(
        split=split_name(config.data),
        samples=len(rows),
        accuracy={c: float(np.mean(np.array(predicted[c]) == rows[c].to_numpy())) for c in JUDGED},
        judge_accuracy_on_real={c: float(np.mean(np.array(real_predicted[c]) == frame[c].to_numpy())) for c in JUDGED},
        frechet_distance_judge=frechet_distance(generated_features, real_features),
        frechet_distance_real_halves=frechet_distance(real_features[:half], real_features[half:]),
    )
    if config.grid:
        from genshop.contact_sheet import save_contact_sheet

        shown = range(min(12, len(rows)))
        save_contact_sheet([(f"{rows['title'][i]} (generated | real)", [generated[i], real_images[positions[i]]])
                            for i in shown], config.grid)
    if config.out:
        write_generated_images(Path(config.out), generated, rows, seeds, predicted)
    return report


def write_generated_images(out: Path, images: list, rows, seeds: list[int], judged: dict[str, list]) -> Path:
    """Each image as ``NNNNN.png`` and one row per image in ``images.parquet`` and ``images.csv``."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, image in enumerate(images):
        path = out / f"{i:05d}.png"
        image.save(path)
        records.append({"image_path": str(path), "prompt": rows["title"][i], "seed": seeds[i],
                        **{f"expected_{c}": rows[c][i] for c in JUDGED}, **{f"judged_{c}": judged[c][i] for c in JUDGED}})
    table = pd.DataFrame.from_records(records)
    table.to_parquet(out / "images.parquet", index=False)
    table.to_csv(out / "images.csv", index=False)
    return out / "images.parquet"


def write_report(report: BaseModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.model_dump(), indent=2))
    return path
