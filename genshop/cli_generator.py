"""Click commands for the generator and its judge: ``genshop train generator``,
``genshop train judge`` and ``genshop eval generator``. Thin faces over
``genshop.training.generator`` and ``genshop.evaluation``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from genshop.cli_train import PARQUET, _progress_bar, stdout

DIRECTORY = click.Path(file_okay=False, path_type=Path)


@click.command("generator")
@click.option("--data", type=PARQUET, multiple=True, required=True, help="catalog parquet (repeatable): the train split")
@click.option("--clip", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="the domain CLIP folder whose text tower conditions the UNet")
@click.option("--out", type=DIRECTORY, required=True, help="run folder; the pipeline lands in OUT/pipeline")
@click.option("--config", "recipe", type=click.Path(exists=True, dir_okay=False), default="configs/generator/train-mini.json",
              show_default=True, help="training recipe JSON (GeneratorTrainingConfig fields)")
@click.option("--vae", type=click.Path(exists=True, file_okay=False), default=None,
              help="a trained AutoencoderKL folder to reuse (skips the VAE stage)")
@click.option("--vae-steps", type=int, default=None)
@click.option("--unet-steps", type=int, default=None, help="0 trains the VAE stage only")
@click.option("--threads", type=int, default=None, help="torch CPU threads")
def train_generator(data, clip, out, recipe, vae, vae_steps, unet_steps, threads) -> None:
    """Train the small latent text-to-image model (VAE, then UNet) in the Stable Diffusion layout; resumes."""
    from genshop.training.generator import GeneratorTrainingConfig
    from genshop.training.generator import train_generator as run

    config = GeneratorTrainingConfig.from_recipe(recipe, data=[str(p) for p in data], clip=str(clip), out=str(out), vae=vae,
                                                 vae_steps=vae_steps, unet_steps=unet_steps, threads=threads)
    with _progress_bar() as bar:
        tasks = {}

        def progress(stage: str, step: int, total: int, metrics: dict) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"train {stage}", total=total, completed=step - 1, detail="")
            bar.update(tasks[stage], completed=step, detail=f"loss {metrics['loss']:.4f}")

        result = run(config, progress)
    stdout.print(f"saved: {result}")


@click.command("judge")
@click.option("--data", type=PARQUET, multiple=True, required=True, help="catalog parquet (repeatable): the train split")
@click.option("--out", type=DIRECTORY, required=True)
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--threads", type=int, default=None)
def train_judge(data, out, epochs, threads) -> None:
    """Train the evaluation-only judge (master category, article type, colour) on real photos."""
    from genshop.evaluation.judge import JudgeTrainingConfig
    from genshop.evaluation.judge import train_judge as run

    with _progress_bar() as bar:
        task = bar.add_task("train judge", total=None, detail="")

        def progress(step: int, total: int, metrics: dict) -> None:
            bar.update(task, total=total, completed=step, detail=f"loss {metrics['loss']:.3f}")

        result = run(JudgeTrainingConfig(data=[str(p) for p in data], out=str(out), epochs=epochs, threads=threads), progress)
    stdout.print(f"saved: {result}")


@click.command("generator")
@click.option("--preset", default=None, help="generation preset: its pipeline, steps, guidance and size (default: GENSHOP_PRESET)")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False), default=None,
              help="a StableDiffusionPipeline folder instead of the preset's (the preset's settings still apply)")
@click.option("--judge", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--data", type=PARQUET, multiple=True, required=True, help="catalog parquet of the split to grade")
@click.option("--samples", type=int, default=400, show_default=True)
@click.option("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
@click.option("--guidance-scale", type=float, default=None, help="default: the preset's")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="write the report here")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="PNG of generated beside real")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="write every generated PNG and images.parquet / images.csv (path, prompt, seed, expected and judged labels)")
def eval_generator(preset, pipeline, judge, data, samples, steps, guidance_scale, json_out, grid, out) -> None:
    """Judge images generated from a split's titles: category, article type and colour match; Fréchet distance."""
    from genshop.evaluation.generator_eval import GeneratorEvalConfig, evaluate_generator, write_report
    from genshop.pipelines import ensure_weights
    from genshop.presets import load_preset
    from genshop.settings import get_settings

    chosen = load_preset(preset or get_settings().preset)
    d = chosen.defaults
    config = GeneratorEvalConfig(pipeline=pipeline or ensure_weights(chosen), judge=judge, data=[str(p) for p in data],
                                 samples=samples, steps=steps or d.steps,
                                 guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
                                 width=d.width, height=d.height, grid=grid, out=out)
    with _progress_bar() as bar:
        task = bar.add_task("generate", total=samples, detail="")
        report = evaluate_generator(config, lambda done, total: bar.update(task, completed=done, total=total))
    table = Table("measure", "generated", "judge on real photos", title=f"generator on {report.samples} {report.split} titles")
    for column, value in report.accuracy.items():
        table.add_row(f"{column} accuracy", f"{value:.3f}", f"{report.judge_accuracy_on_real[column]:.3f}")
    table.add_row("Fréchet distance (judge features)", f"{report.frechet_distance_judge:.3f}",
                  f"{report.frechet_distance_real_halves:.3f} (real vs real)")
    stdout.print(table)
    if json_out:
        stdout.print(f"report: {write_report(report, json_out)}")
    if out:
        stdout.print(f"images and their table: {out}/images.parquet, {out}/images.csv")
