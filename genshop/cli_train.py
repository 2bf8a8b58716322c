"""Click commands for the domain CLIP: ``train_clip`` (``genshop train clip``) and ``eval_clip`` (``genshop eval clip``).

Thin faces: they build a config, call the job with one progress callback that drives
a rich progress bar, and print the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

stderr = Console(stderr=True)
stdout = Console()
if not stdout.is_terminal and "COLUMNS" not in os.environ:
    stdout.width = max(stdout.width, 160)  # tables written to a pipe or a file keep their columns

PARQUET = click.Path(exists=True, dir_okay=False, path_type=Path)


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=stderr)


def stage_progress(bar: Progress):
    """A ``(stage, done, total)`` progress callback that gives every stage its own bar."""
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or None, detail="")
        bar.update(tasks[stage], completed=done, total=total or None)

    return on_progress


def embedding_config(model: str, backend: str | None = None, pretrained: str | None = None, **options):
    """The embedding config for a CLI's --model/--backend/--pretrained: a folder tells its own backend."""
    from genshop.embedding import EmbeddingConfig

    if backend is None and Path(model).is_dir():
        return EmbeddingConfig.for_directory(model, **options)
    return EmbeddingConfig(backend=backend or "open_clip", model=model, pretrained=pretrained, **options)


@click.command("clip")
@click.option("--data", "data", type=PARQUET, multiple=True, required=True, help="catalog parquet (repeatable)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="run folder: model/, text_encoder/, tokenizer/, checkpoint/, log.jsonl, loss.png")
@click.option("--config", "recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="training recipe JSON (ClipTrainingConfig fields), e.g. configs/clip/train-clip-mini.json")
@click.option("--val-data", type=PARQUET, multiple=True, help="parquet for a held-out loss at checkpoints")
@click.option("--architecture", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="open_clip model config JSON (default configs/clip/genshop-clip-mini.json)")
@click.option("--epochs", type=float, default=None)
@click.option("--max-steps", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", "learning_rate", type=float, default=None)
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--seed", type=int, default=None)
@click.option("--resume/--no-resume", default=True, show_default=True, help="continue from <out>/checkpoint if present")
def train_clip(data, out_dir, recipe, val_data, architecture, epochs, max_steps, batch_size, learning_rate,
               mixed_precision, threads, seed, resume) -> None:
    """Contrastive image–text training of the domain CLIP on catalog parquet files."""
    from genshop.training.clip import ClipTrainingConfig
    from genshop.training.clip import train_clip as run_training

    fields = json.loads(recipe.read_text(encoding="utf-8")) if recipe else {}
    overrides = {"architecture": architecture, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
                 "learning_rate": learning_rate, "mixed_precision": mixed_precision, "threads": threads, "seed": seed}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if val_data:
        fields["val_data"] = list(val_data)
    config = ClipTrainingConfig(data=list(data), out_dir=out_dir, resume=resume, **fields)

    with _progress_bar() as bar:
        task = bar.add_task("train clip", total=None, detail="")

        def on_progress(p) -> None:
            detail = p.message
            if p.loss is not None:
                detail = (f"epoch {p.epoch:.2f}  loss {p.loss:.3f}  lr {p.lr:.1e}  scale {p.logit_scale:.1f}  "
                          f"{p.samples_per_s:.0f} img/s")
            bar.update(task, total=p.total_steps or None, completed=p.step, detail=detail or "")

        model_dir = run_training(config, on_progress)
    stdout.print(f"model: {model_dir}\ntext encoder: {out_dir / 'text_encoder'}\nloss curves: {out_dir / 'loss.png'}")


@click.command("clip")
@click.option("--model", "model", required=True,
              help="model folder (open_clip or transformers, told by its files), a built-in open_clip "
                   "architecture name with --pretrained, or a transformers hub id with --backend transformers")
@click.option("--backend", type=click.Choice(["open_clip", "transformers"]), default=None,
              help="default: detected from the model folder")
@click.option("--pretrained", default=None, help="open_clip: local .safetensors checkpoint file for a built-in architecture")
@click.option("--data", "data", type=PARQUET, multiple=True, required=True, help="catalog parquet, e.g. catalog-val.parquet")
@click.option("--prior-data", "prior_data", type=PARQUET, multiple=True,
              help="labelled catalog (the train split) whose label frequencies are the zero-shot label prior; "
                   "the targets apply to the prior-corrected numbers")
@click.option("--json-out", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the report as JSON (default <model>/eval-<split>.json for a model folder)")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--max-rows", type=int, default=None, help="evaluate on the first rows only")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
def eval_clip(model, backend, pretrained, data, prior_data, json_out, batch_size, max_rows, device, threads) -> None:
    """Zero-shot categorization and title→image retrieval on a catalog split; prints a table, writes JSON."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from genshop.evaluation.clip_eval import ClipEvalConfig, evaluate_clip

    embedding = embedding_config(model, backend, pretrained, batch_size=batch_size, device=device)
    config = ClipEvalConfig(embedding=embedding, data=list(data), max_rows=max_rows, prior_data=list(prior_data))
    with _progress_bar() as bar:
        report = evaluate_clip(config, stage_progress(bar))

    table = Table("metric", "value", "target", "pass", title=f"{report.model} ({report.backend}), {report.rows} rows")
    passed = report.passed()
    for name, value in report.metrics.items():
        target = report.targets.get(name)
        table.add_row(name, f"{value:.4f}", "" if target is None else f">= {target}",
                      "" if target is None else ("yes" if passed[name] else "no"))
    stdout.print(table)
    if json_out is None and Path(model).is_dir():
        json_out = Path(model) / f"eval-{Path(data[0]).stem}.json"
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.model_dump_json(indent=2), encoding="utf-8")
        stdout.print(f"report: {json_out}")
