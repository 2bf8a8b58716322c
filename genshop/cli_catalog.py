"""Click commands over the catalog and its index: ``genshop catalog import`` and ``genshop search``.

Both use the enrich stage the settings configure (``GENSHOP_EMBEDDING_MODEL``, the
understanding folder, ``GENSHOP_INDEX_DIR``), the same one the workers run.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from genshop.cli_train import PARQUET, _progress_bar, stdout


class InvalidQuery(click.ClickException):
    exit_code = 2


def _enricher():
    from genshop.enrichment import enrich_config_from_settings, load_enricher
    from genshop.settings import get_settings

    return load_enricher(enrich_config_from_settings(get_settings()))


@click.group()
def catalog() -> None:
    """The shop's real catalog, beside the generated items."""


@catalog.command("import")
@click.argument("data", type=PARQUET, nargs=-1, required=True)
@click.option("--limit", type=int, default=None, help="import the first rows only")
@click.option("--enrich/--no-enrich", default=True, show_default=True,
              help="embed, categorize and index the products as they are imported")
@click.option("--json", "as_json", is_flag=True)
def import_command(data, limit, enrich, as_json) -> None:
    """Load catalog parquet files (the fashion-products format) into the store and the index."""
    from genshop.enrichment import import_catalog
    from genshop.store import open_store

    enricher = _enricher() if enrich else None
    with _progress_bar() as bar:
        task = bar.add_task("importing", total=None, detail="")
        report = import_catalog(open_store(), list(data), enricher, limit,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    stdout.print_json(report.model_dump_json()) if as_json else stdout.print(
        f"{report.rows} rows: {report.added} new products, {report.enriched} indexed")


def _filters(values: tuple[str, ...]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for value in values:
        field, sep, wanted = value.partition("=")
        if not sep or not field or not wanted:
            raise InvalidQuery(f"--filter: expected FIELD=VALUE, got {value!r}")
        filters.setdefault(field, []).append(wanted)
    return filters


@click.command()
@click.argument("query", required=False)
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="query image (image→image search; with QUERY, both are combined)")
@click.option("--category", "category", is_flag=True,
              help="search the multimodal product vectors (image + title + attributes) with a category query")
@click.option("--k", type=int, default=10, show_default=True)
@click.option("--filter", "filters", multiple=True, help="FIELD=VALUE, e.g. master_category=Apparel (repeatable)")
@click.option("--json", "as_json", is_flag=True)
def search(query, image, category, k, filters, as_json) -> None:
    """Search generated and catalog items by text ("red kurta for women") or by image."""
    from genshop.embedding import EmbeddingConfig, load_embedder
    from genshop.enrichment import PRODUCT_INDEX, PRODUCT_NAME, readable_index
    from genshop.settings import get_settings
    from genshop.understanding.index import IndexInputError
    from genshop.understanding.search import QueryError
    from genshop.understanding.search import search as search_index

    settings = get_settings()
    if settings.embedding_model is None:
        raise click.ClickException("GENSHOP_EMBEDDING_MODEL is 'off': there is no index to search")
    folder = settings.index_url or (settings.index_dir / PRODUCT_INDEX if category else settings.index_dir)
    index = readable_index(settings.index_dir, settings.index_url, PRODUCT_NAME if category else "main")
    if index is None:
        raise click.ClickException(f"no index in {folder}: run `genshop catalog import` or generate first"
                                   + (" with an understanding folder that has a product vector" if category else ""))
    embedder = load_embedder(EmbeddingConfig.for_directory(settings.embedding_model, device=settings.device))
    try:
        hits = search_index(index, embedder, query, image, k, _filters(filters) or None)
    except (QueryError, IndexInputError) as exc:
        raise InvalidQuery(str(exc)) from None
    if as_json:
        click.echo(json.dumps([{"id": h.id, "score": h.score, **h.metadata} for h in hits], indent=2))
        return
    table = Table("#", "score", "kind", "title", "category", "colour", "image", title=f"{len(hits)} hits")
    for rank, hit in enumerate(hits, 1):
        meta = hit.metadata
        table.add_row(str(rank), f"{hit.score:.3f}", meta.get("kind", ""), meta.get("title", ""),
                      meta.get("article_type", ""), meta.get("colour", ""), meta.get("image_path", ""))
    stdout.print(table)
