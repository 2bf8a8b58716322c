"""Click commands for a deployment's shared parts: ``genshop index serve`` and ``genshop db``."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("index")
def index_group() -> None:
    """The index owner: one process holding the vector indexes for every machine."""


@index_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8100, show_default=True)
@click.option("--dir", "index_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="index folder on this machine (default: GENSHOP_INDEX_DIR)")
def index_serve(host: str, port: int, index_dir: Path | None) -> None:
    """Serve the indexes in GENSHOP_INDEX_DIR over HTTP; every other process sets GENSHOP_INDEX_URL to it."""
    import faiss
    import uvicorn

    from genshop.settings import get_settings
    from genshop.understanding.remote import create_index_app

    import os

    faiss.omp_set_num_threads(int(os.environ.get("GENSHOP_INDEX_THREADS", "1")))  # single queries: one thread each
    folder = index_dir or get_settings().index_dir
    folder.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_index_app(folder), host=host, port=port, log_level="info")
