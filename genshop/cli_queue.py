"""Click commands for queue control (``genshop queue pause | resume | clear | status``) and
designers' picks as preference data (``genshop picks export``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from genshop.cli_train import stdout

DESIGNER = click.option("--designer", default=None,
                        help="one designer's briefs (default: the whole queue; for clear: the CLI's briefs)")


def _store():
    from genshop.store import open_store

    return open_store()


def _print(action: str, brief_ids: list[str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({action: brief_ids}))
    else:
        stdout.print(f"{action} {len(brief_ids)} brief(s)" + "".join(f"\n  {b}" for b in brief_ids), markup=False)


@click.group("queue")
def queue_group() -> None:
    """Pause, resume or clear the generation queue (all of it, or one designer's briefs)."""


@queue_group.command("pause")
@DESIGNER
@click.option("--json", "as_json", is_flag=True)
def queue_pause(designer: str | None, as_json: bool) -> None:
    """Hold queued briefs (and any submitted meanwhile) until `genshop queue resume`; running ones finish."""
    from genshop.queueing import pause
    from workers.app import withdraw_generation_messages

    _print("paused", pause(_store(), designer, withdraw_generation_messages), as_json)


@queue_group.command("resume")
@DESIGNER
@click.option("--json", "as_json", is_flag=True)
def queue_resume(designer: str | None, as_json: bool) -> None:
    """End a pause: its briefs go back on the queue, each at its place."""
    from genshop.queueing import resume
    from workers.app import check_broker, enqueue_generation

    _print("resumed", resume(_store(), designer, enqueue_generation, check_broker), as_json)


@queue_group.command("clear")
@DESIGNER
@click.option("--json", "as_json", is_flag=True)
def queue_clear(designer: str | None, as_json: bool) -> None:
    """Cancel every queued or paused brief of a designer in one call."""
    from genshop.queueing import clear
    from workers.app import withdraw_generation_messages

    _print("cancelled", clear(_store(), designer, withdraw_generation_messages), as_json)


@queue_group.command("status")
@DESIGNER
@click.option("--json", "as_json", is_flag=True)
def queue_status(designer: str | None, as_json: bool) -> None:
    """The pauses in force and the briefs waiting (queued, paused)."""
    from genshop.queueing import queue_state

    state = queue_state(_store(), designer)
    if as_json:
        click.echo(state.model_dump_json())
        return
    pauses = (["the whole queue"] if state.paused_all else []) + [f"designer {d}" for d in state.paused_designers]
    stdout.print(f"paused: {', '.join(pauses) or 'nothing'}\nqueued: {state.queued}  paused briefs: {state.paused}",
                 markup=False)


@click.group("picks")
def picks_group() -> None:
    """Designers' picks and rejections in the gallery, as preference data."""


@picks_group.command("export")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="impressions Parquet (default: $GENSHOP_HOME/preferences/manual.parquet)")
@DESIGNER
@click.option("--json", "as_json", is_flag=True)
def picks_export(out: Path | None, designer: str | None, as_json: bool) -> None:
    """Write the picks as impressions (source `manual`) for `reward train --impressions` and `tune --preferences`."""
    from genshop.experiments.picks import export_picks
    from genshop.settings import get_settings

    report = export_picks(_store(), out or get_settings().home / "preferences" / "manual.parquet", designer)
    if as_json:
        click.echo(report.model_dump_json())
        return
    unused = "".join(f"; {n} not usable: {reason}" for reason, n in report.not_usable.items())
    stdout.print(f"{report.picks} picks → {report.impressions} impressions in {report.out}{unused}", markup=False)
