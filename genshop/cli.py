"""``genshop``: the command line, a thin face over the service.

Exit status: 0 on success, 2 on invalid input (the offending fields on stderr), 1 on
anything else (a failed or cancelled brief, a broker or model that cannot be reached).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from genshop.briefs import BriefError
from genshop.cli_train import stderr, stdout
from genshop.presets import ModelUnavailableError, PresetError
from genshop.settings import get_settings
from genshop.store import BriefRecord, Store, UnknownBriefError



class InvalidInput(click.ClickException):
    exit_code = 2


class GenshopGroup(click.Group):
    """Turns the project's errors into one-line messages and the documented exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BriefError as exc:
            stderr.print(f"Error: invalid brief in {exc.source}:", highlight=False, markup=False, soft_wrap=True)
            for issue in exc.issues:  # one line each, however narrow the terminal
                stderr.print(f"  {issue}", highlight=False, markup=False, soft_wrap=True)
            raise SystemExit(2) from None
        except (UnknownBriefError, PresetError) as exc:
            raise InvalidInput(str(exc)) from None
        except ModelUnavailableError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a face: no tracebacks unless asked for
            if os.environ.get("GENSHOP_DEBUG"):
                raise
            raise click.ClickException(f"{type(exc).__name__}: {exc}".splitlines()[0]) from None


@click.group(cls=GenshopGroup)
def main() -> None:
    """GenShop: generative design for e-commerce."""


def _store() -> Store:
    from genshop.store import open_store

    return open_store()


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=stderr, transient=False)


def _brief_json(record: BriefRecord, store: Store, with_items: bool) -> dict:
    from genshop.service import item_details

    data = {"brief_id": record.id, **record.model_dump(mode="json")}
    items = item_details(store, record.id) if with_items else store.list_items(record.id)
    data["items_count"] = len(items)
    if with_items:
        data["items"] = [{**item.model_dump(mode="json"), "image_path": str(store.images.path(item.image_path))}
                         for item in items]
    return data


def _print_record(record: BriefRecord, store: Store, as_json: bool, with_items: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(_brief_json(record, store, with_items)))
        return
    p = record.progress
    detail = f"  variants {p.get('variants_done', 0)}/{p.get('variants_total', record.brief.variants)}" if p else ""
    stdout.print(f"{record.id}  {record.status}{detail}  {record.title}", highlight=False, markup=False)
    if record.error:
        stdout.print(f"  error: {record.error}", highlight=False, markup=False)
    if with_items:
        from genshop.service import item_details

        table = Table("variant", "seed", "model", "scores (group: reward)", "category", "image")
        for item in item_details(store, record.id):
            scores = " ".join(f"{s.group_id}: {s.score:+.2f}" for s in item.scores) or "-"
            category = "-"
            if item.understanding is not None:
                article = item.understanding.categories.get("article_type", {})
                category = f"{article.get('label') or 'abstained'} ({article.get('confidence', 0.0):.2f})"
            table.add_row(str(item.variant), str(item.seed), item.model_id.rsplit("+", 1)[-1] if "+lora:" in item.model_id
                          else "base", scores, category, str(store.images.path(item.image_path)))
        stdout.print(table)


def _brief_progress_callback(bar: Progress, record: BriefRecord) -> Callable:
    task = bar.add_task(record.title[:40], total=record.brief.variants * record.brief.steps, detail="")

    def on_progress(p) -> None:
        bar.update(task, completed=p.variants_done * p.steps + (0 if p.step == p.steps else p.step),
                   detail=f"variants {p.variants_done}/{p.variants_total}")

    return on_progress


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("genshop-demo"),
              show_default=True, help="folder for the demo's database, images and contact sheet")
@click.option("--preset", default=None, help="generation preset (default: GENSHOP_PRESET, i.e. mini)")
def demo(out_dir: Path, preset: str | None) -> None:
    """Run the product tour offline with an in-process worker and write a contact sheet."""
    from genshop.demo import run_demo

    preset = preset or get_settings().preset
    stderr.print(f"GenShop demo: preset [bold]{preset}[/bold], output in {out_dir}")
    with _progress_bar() as bar:
        records, sheet = run_demo(out_dir, preset, lambda record: _brief_progress_callback(bar, record))
    table = Table("brief", "status", "variants", "title")
    for record in records:
        table.add_row(record.id[:12], record.status, str(record.brief.variants), record.title)
    stdout.print(table)
    stdout.print(f"contact sheet: {sheet}")
    if any(r.status != "succeeded" for r in records):
        raise SystemExit(1)


@main.command()
@click.option("-c", "--concurrency", type=click.IntRange(1, 64), default=1, show_default=True,
              help="worker processes (one per GPU on GPU machines)")
@click.option("--loglevel", default="info", show_default=True)
@click.option("--pool", type=click.Choice(["prefork", "solo"]), default="prefork", show_default=True)
@click.option("-n", "--hostname", default="genshop@%h", show_default=True, help="node name; unique per worker")
@click.option("-Q", "--queues", default=None, help="comma-separated queues (default: generate, score and enrich)")
def worker(concurrency: int, loglevel: str, pool: str, hostname: str, queues: str | None) -> None:
    """Start a Celery worker (models loaded once per process, only those its queues need)."""
    settings = get_settings()
    _database_ready()
    queues = queues or ",".join(settings.worker_queues)
    os.environ["GENSHOP_WORKER_QUEUES"] = queues
    os.environ.setdefault("GENSHOP_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // concurrency)))
    _supervise([sys.executable, "-m", "celery", "-A", "workers.app:app", "worker", f"--concurrency={concurrency}",
                f"--loglevel={loglevel}", f"--pool={pool}", f"--queues={queues}", f"--hostname={hostname}",
                "--without-gossip", "--without-mingle"])


def _database_ready() -> None:
    """The schema at this code's revision before a worker or server starts: upgraded, or refused
    with one line (``genshop.db``; ``GENSHOP_DB_AUTO_UPGRADE``). A database that cannot be reached
    yet is not a reason to stay down: the process starts, says so, and every store it opens later
    checks (and upgrades) the schema then, as the requeue sweep retries until it can."""
    from sqlalchemy.exc import OperationalError

    from genshop.db import SchemaError

    try:
        _store()
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from None
    except OperationalError as exc:
        stderr.print(f"warning: the database cannot be reached yet ({str(exc.orig or exc).splitlines()[0]}); "
                     "starting anyway, its schema is checked when it answers", highlight=False, markup=False)


def _supervise(argv: list[str], restart_delay_s: float = 1.0) -> None:
    """Run the Celery worker as a child and start it again if it dies unasked.

    Celery shuts a worker down on errors it cannot recover from, and a broker restart can
    raise one inside kombu while a late ack races the reconnection. SIGTERM or SIGINT to
    this process (or its process group) stops the worker for good.
    """
    import signal
    import subprocess

    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        child = subprocess.Popen(argv)
        code = child.wait()
        if stopping or code == 0:
            raise SystemExit(code)
        stderr.print(f"worker exited with status {code}; starting it again", markup=False)
        time.sleep(restart_delay_s)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
def serve(host: str, port: int) -> None:
    """Serve the designers' HTTP API (/api, OpenAPI at /docs) and the web gallery (/)."""
    import torch
    import uvicorn

    from genshop.web.app import create_app

    settings = get_settings()
    if not settings.api_tokens:
        raise click.ClickException("no API tokens: set GENSHOP_API_TOKENS='designer:TOKEN,...' or "
                                   "GENSHOP_API_TOKENS_FILE (a YAML mapping of designer to token)")
    torch.set_num_threads(int(os.environ.get("GENSHOP_TORCH_THREADS", "1")))  # many small concurrent queries
    import faiss

    faiss.omp_set_num_threads(int(os.environ.get("GENSHOP_INDEX_THREADS", "1")))  # OpenMP threads spin on shared cores
    _database_ready()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="wait for the brief to finish, showing progress")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--local", is_flag=True, help="run it here with an in-process worker (no Redis)")
@click.option("--front", is_flag=True, help="at the front of the queue (the brief's `priority: high`)")
def submit(file: Path, wait: bool, as_json: bool, local: bool, front: bool) -> None:
    """Validate a brief file (YAML or JSON), store it and queue it."""
    from genshop.briefs import load_brief_file
    from genshop.presets import load_preset

    settings = get_settings()
    brief = load_brief_file(file, load_preset(settings.preset))  # schema and limits, before the heavy imports
    if front:
        brief = brief.model_copy(update={"priority": "high"})
    from genshop.service import submit_brief

    models = None
    if local:  # a model that cannot load stores nothing (and queueing a brief never imports torch)
        from genshop.local_worker import load_local_models, run_locally

        models = load_local_models(settings.preset)
    store = _store()
    try:
        record, created = submit_brief(store, brief, settings.preset)
    except BriefError as exc:
        raise BriefError(exc.issues, str(file)) from None
    if local:
        if record.status == "queued":
            with _progress_bar() as bar:
                if as_json:
                    bar.stop()
                record = run_locally(store, record.id, models, None if as_json else _brief_progress_callback(bar, record))
    else:
        if created:
            from genshop.service import enqueue_brief
            from workers.app import enqueue_new_brief

            record = enqueue_brief(store, record.id, enqueue_new_brief)
        if wait:
            record = _wait(store, record, show=not as_json)
    if as_json:
        click.echo(json.dumps({**_brief_json(record, store, with_items=False), "created": created}))
    else:
        stderr.print("created" if created else "already submitted (same client_reference)", style="dim")
        _print_record(record, store, as_json=False)
    if (wait or local) and record.status != "succeeded":
        raise SystemExit(1)


def _wait(store: Store, record: BriefRecord, show: bool, poll_s: float = 0.2) -> BriefRecord:
    with _progress_bar() as bar:
        if not show:
            bar.stop()
        update = _brief_progress_callback(bar, record)
        from genshop.service import Progress as BriefProgress

        while not record.is_terminal:
            time.sleep(poll_s)
            record = store.get_brief(record.id)
            if record.progress:
                update(BriefProgress.model_validate(record.progress))
    return record


@main.command()
@click.argument("brief_id")
@click.option("--json", "as_json", is_flag=True)
def status(brief_id: str, as_json: bool) -> None:
    """Show a brief's status and progress."""
    store = _store()
    _print_record(store.get_brief(brief_id), store, as_json)


@main.command()
@click.argument("brief_id")
@click.option("--json", "as_json", is_flag=True)
def cancel(brief_id: str, as_json: bool) -> None:
    """Cancel a brief: a queued one at once, a running one at its next denoising step."""
    from genshop.service import cancel_brief
    from workers.app import revoke_task

    store = _store()
    _print_record(cancel_brief(store, brief_id, revoke_task), store, as_json)


@main.command()
@click.argument("brief_id")
@click.option("--json", "as_json", is_flag=True)
def results(brief_id: str, as_json: bool) -> None:
    """Print a brief with its items (image paths are absolute)."""
    store = _store()
    _print_record(store.get_brief(brief_id), store, as_json, with_items=True)


@main.group()
def train() -> None:
    """Train the project's own models on a catalog (domain CLIP, generator, judge)."""


@main.group("eval")
def evaluate() -> None:
    """Evaluate models on a catalog split; prints a table, writes JSON."""


def _register_model_commands() -> None:
    from genshop.cli_generator import eval_generator, train_generator, train_judge
    from genshop.cli_reward import reward, simulate
    from genshop.cli_train import eval_clip, train_clip
    from genshop.cli_catalog import catalog, search
    from genshop.cli_understand import understand
    from genshop.cli_experiments import export, import_group, report
    from genshop.cli_tune import tune
    from genshop.cli_infra import db_group, index_group
    from genshop.cli_queue import picks_group, queue_group
    from genshop.cli_audit import audit, explain

    main.add_command(reward)
    main.add_command(understand)
    main.add_command(catalog)
    main.add_command(search)
    main.add_command(simulate)
    main.add_command(export)
    main.add_command(import_group, "import")
    main.add_command(report)
    main.add_command(tune)
    main.add_command(index_group)
    main.add_command(db_group)
    main.add_command(queue_group)
    main.add_command(picks_group)
    main.add_command(audit)
    main.add_command(explain)

    for command in (train_clip, train_generator, train_judge):
        train.add_command(command)
    for command, name in ((eval_clip, "clip"), (eval_generator, "generator")):
        evaluate.add_command(command, name)


_register_model_commands()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
