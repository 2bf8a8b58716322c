"""Click commands for catalog understanding: the ``understand`` group (``taxonomy``, ``fit``, ``eval``).

Thin faces: each builds a config, calls one job from ``genshop.understanding`` or
``genshop.evaluation`` with a progress callback, and prints the result.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from genshop.cli_train import PARQUET, _progress_bar, embedding_config, stage_progress, stdout
from genshop.settings import DEFAULT_TAXONOMY

MODEL_HELP = "CLIP: a model folder (open_clip or transformers), or an open_clip architecture with --pretrained"


@click.group()
def understand() -> None:
    """Catalog understanding: the taxonomy file, top-tuned heads, categorization and attribute evaluation."""


@understand.command("taxonomy")
@click.option("--data", "data", type=PARQUET, multiple=True, required=True, help="labelled catalog (the train split)")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_TAXONOMY,
              show_default=True)
def build_taxonomy(data, out) -> None:
    """Write the taxonomy and attribute families (with label counts) of a labelled catalog as YAML."""
    from genshop.catalog_data import read_catalog
    from genshop.understanding.taxonomy import save_taxonomy, taxonomy_from_catalog

    frame = read_catalog(list(data), with_images=False)
    taxonomy = taxonomy_from_catalog(frame, source=", ".join(Path(p).name for p in data))
    save_taxonomy(taxonomy, out)
    stdout.print(f"{len(taxonomy.article_types)} article types, families "
                 f"{[family.name for family in taxonomy.attributes]}: {out}")


@understand.command("fit")
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--pretrained", default=None)
@click.option("--data", "data", type=PARQUET, multiple=True, required=True, help="labelled catalog (the train split)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--taxonomy", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEFAULT_TAXONOMY)
@click.option("--max-rows", type=int, default=None)
def fit(model, pretrained, data, out_dir, taxonomy, max_rows) -> None:
    """Top-tuning: linear heads on frozen CLIP image features, plus calibration temperatures."""
    from genshop.understanding.fitting import FitConfig, fit_understanding

    config = FitConfig(embedding=embedding_config(model, pretrained=pretrained), data=list(data), out_dir=out_dir,
                       taxonomy=taxonomy, max_rows=max_rows)
    with _progress_bar() as bar:
        folder = fit_understanding(config, stage_progress(bar))
    stdout.print(f"heads: {folder}")


@understand.command("eval")
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--pretrained", default=None)
@click.option("--data", "data", type=PARQUET, multiple=True, required=True, help="labelled catalog (the val split)")
@click.option("--heads", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder from `genshop understand fit`: adds the top-tuned column and calibrates zero-shot")
@click.option("--taxonomy", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEFAULT_TAXONOMY)
@click.option("--abstain-below", type=float, default=0.5, show_default=True)
@click.option("--max-rows", type=int, default=None)
@click.option("--json-out", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def eval_understanding(model, pretrained, data, heads, taxonomy, abstain_below, max_rows, json_out) -> None:
    """Categorization and attributes on a labelled split: zero-shot and top-tuned side by side."""
    from genshop.evaluation.understanding_eval import UnderstandingEvalConfig, evaluate_understanding

    config = UnderstandingEvalConfig(embedding=embedding_config(model, pretrained=pretrained), data=list(data),
                                     taxonomy=taxonomy, heads=heads, abstain_below=abstain_below, max_rows=max_rows)
    with _progress_bar() as bar:
        report = evaluate_understanding(config, stage_progress(bar))
    kinds = list(report.metrics)
    table = Table("metric", *kinds, title=f"{report.model}, {report.rows} rows, abstain below {report.abstain_below}")
    for name in report.metrics[kinds[0]]:
        table.add_row(name, *(f"{report.metrics[kind].get(name, float('nan')):.4f}" for kind in kinds))
    stdout.print(table)
    retrieval = Table("category → product retrieval", "mAP")
    for name, value in report.retrieval.items():
        retrieval.add_row(name, f"{value:.4f}")
    stdout.print(retrieval)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.model_dump_json(indent=2), encoding="utf-8")
        stdout.print(f"report: {json_out}")


@understand.command("images")
@click.argument("images", type=click.Path(exists=True, dir_okay=False, path_type=Path), nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def understand_image_files(images, as_json) -> None:
    """Categorize image files with the enrich stage the settings configure: path, attributes, title."""
    import json

    from genshop.enrichment import enrich_config_from_settings, load_enricher, understand_images
    from genshop.settings import get_settings
    from genshop.understanding.search import load_query_image

    enricher = load_enricher(enrich_config_from_settings(get_settings()))
    _, understood = understand_images(enricher, [load_query_image(path) for path in images])
    if as_json:
        click.echo(json.dumps([{"image": str(path), **u.model_dump()} for path, u in zip(images, understood)], indent=2))
        return
    table = Table("image", "category (confidence)", "attributes", "title")
    for path, u in zip(images, understood):
        path_text = " > ".join(f"{getattr(u, level).label or '?'} ({getattr(u, level).confidence:.2f})"
                               for level in ("master_category", "sub_category", "article_type"))
        attributes = ", ".join(f"{name}={score.label or '?'} ({score.confidence:.2f})" for name, score in u.attributes.items())
        table.add_row(str(path), path_text, attributes, u.title)
    stdout.print(table)
