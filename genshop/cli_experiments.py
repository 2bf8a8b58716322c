"""Click commands for A/B experiments: ``genshop export ab``, ``genshop import ab-results``,
``genshop report ab`` and ``genshop simulate ab``. Thin faces over ``genshop.experiments``;
invalid input exits with status 2, every offending field or row on stderr, nothing written."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from genshop.cli_reward import DEFAULT_GROUPS, FILE, InvalidInput, simulate, stderr, stdout
from genshop.cli_train import _progress_bar


def _invalid(exc: Exception) -> InvalidInput:
    from genshop.experiments.manifest import ExperimentInputError

    if isinstance(exc, ExperimentInputError):
        for issue in exc.issues[:20]:
            stderr.print(f"  {issue}", highlight=False, markup=False, soft_wrap=True)
        if len(exc.issues) > 20:
            stderr.print(f"  ... and {len(exc.issues) - 20} more", highlight=False)
        return InvalidInput(f"{len(exc.issues)} problem(s), nothing written")
    return InvalidInput(str(exc))


def _experiment(experiment_id: str):
    from genshop.experiments.manifest import Manifest
    from genshop.store import UnknownExperimentError, open_store

    store = open_store()
    try:
        record = store.get_experiment(experiment_id)
    except UnknownExperimentError as exc:
        raise InvalidInput(str(exc)) from None
    return store, record, Manifest.model_validate(record.manifest)


@click.group("export")
def export() -> None:
    """Export generated listings for an A/B test."""


@export.command("ab")
@click.option("--briefs", "brief_ids", default=None, help="comma-separated brief ids")
@click.option("--all", "all_briefs", is_flag=True, help="every succeeded brief")
@click.option("--arms", required=True, help='e.g. "control=catalog,base=preset:mini,tuned=model:ID" (first: control)')
@click.option("--weights", default=None, help="traffic weights, one per arm, e.g. 1,1,2 (default: equal)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "jsonl"]), default="parquet", show_default=True)
@click.option("--experiment", "experiment_id", default=None, help="experiment id (default: the name of --out)")
@click.option("--salt", default=None, help="assignment salt (default: random, recorded in the manifest)")
@click.option("--force", is_flag=True, help="replace an existing --out")
@click.option("--json", "as_json", is_flag=True)
def export_ab_command(brief_ids, all_briefs, arms, weights, out, fmt, experiment_id, salt, force, as_json) -> None:
    """Listings (title, description, category, attributes, image, per-group rewards, versions, arm) and a manifest."""
    from genshop.experiments.export import ExportConfig, export_ab
    from genshop.experiments.manifest import ExperimentInputError, parse_arms
    from genshop.store import open_store

    if bool(brief_ids) == all_briefs:
        raise InvalidInput("pass exactly one of --briefs IDS and --all")
    try:
        config = ExportConfig(out=out, arms=parse_arms(arms, weights), format=fmt, experiment_id=experiment_id,
                              salt=salt, force=force,
                              briefs=None if all_briefs else [b.strip() for b in brief_ids.split(",") if b.strip()])
        with _progress_bar() as bar:
            task = bar.add_task("export", total=None, detail="")
            manifest = export_ab(open_store(), config, lambda done, total: bar.update(task, completed=done, total=total))
    except (ExperimentInputError, ValueError) as exc:
        raise _invalid(exc) from None
    if as_json:
        stdout.print_json(manifest.model_dump_json())
        return
    table = Table("arm", "selector", "weight", "listings", title=f"experiment {manifest.experiment_id} → {out}")
    for arm in manifest.arms:
        table.add_row(arm.name + (" (control)" if arm.name == manifest.control else ""), arm.selector,
                      f"{arm.weight:g}", str(arm.listings))
    stdout.print(table)


@click.group("import")
def import_group() -> None:
    """Bring outside data back in."""


@import_group.command("ab-results")
@click.argument("file", type=FILE)
@click.option("--groups", type=FILE, default=DEFAULT_GROUPS, show_default=True, help="groups YAML: the known group ids")
@click.option("--replace", is_flag=True, help="replace results imported before for this experiment")
@click.option("--json", "as_json", is_flag=True)
def import_ab_results_command(file, groups, replace, as_json) -> None:
    """Validate and store an experiment's funnel counts; write them as preference data for the reward model."""
    from genshop.experiments.manifest import ExperimentInputError
    from genshop.experiments.results import import_ab_results
    from genshop.settings import get_settings
    from genshop.store import open_store
    from reward.groups import GroupsConfigError, load_groups

    try:
        known = {group.id for group in load_groups(groups)}
        report = import_ab_results(open_store(), file, known, get_settings().home / "preferences", replace=replace)
    except (ExperimentInputError, GroupsConfigError) as exc:
        raise _invalid(exc) from None
    stdout.print_json(report.model_dump_json()) if as_json else stdout.print(
        f"{report.rows} result rows of {report.experiment_id} imported; "
        f"{report.preference_impressions} preference impressions → {report.preferences}")


@click.group("report")
def report() -> None:
    """Read out experiments."""


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _uplift(uplift) -> str:
    if uplift is None:
        return "-"
    return f"{100 * uplift.relative:+.1f}% [{100 * uplift.ci_low:+.1f}, {100 * uplift.ci_high:+.1f}] p={uplift.p_value:.3g}"


@report.command("ab")
@click.argument("experiment_id")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where report.json and report.png go (default: EXPORT/report)")
@click.option("--json", "as_json", is_flag=True)
def report_ab_command(experiment_id, out, as_json) -> None:
    """CTR and CVR per arm and group, uplift vs control with 95% CIs, sample-ratio-mismatch check, plots."""
    from genshop.experiments.readout import ab_report

    store, record, manifest = _experiment(experiment_id)
    results = store.list_ab_results(experiment_id)
    if not results:
        raise InvalidInput(f"experiment {experiment_id!r} has no imported results (genshop import ab-results FILE)")
    out = out or Path(record.export_dir) / "report"
    result = ab_report(manifest, results, out / "report.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(result.model_dump_json(indent=2))
    if as_json:
        stdout.print_json(result.model_dump_json())
        return
    table = Table("arm", "group", "impressions", "CTR", "CTR uplift [95% CI]", "CVR", "CVR uplift [95% CI]",
                  title=f"experiment {experiment_id} (control: {manifest.control})")
    for row in result.arms + result.groups:
        table.add_row(row.arm, row.group or "all", str(row.impressions), _percent(row.ctr), _uplift(row.ctr_uplift),
                      _percent(row.cvr), _uplift(row.cvr_uplift))
    stdout.print(table)
    srm = result.srm
    stdout.print(f"sample ratio: chi2={srm.chi2:.2f} p={srm.p_value:.3g}"
                 + (" [bold red]MISMATCH[/]" if srm.mismatch else " ok"))
    stdout.print(f"report: {out / 'report.json'}\nplot: {result.plot}")


@simulate.command("ab")
@click.argument("experiment_id")
@click.option("--groups", type=FILE, default=DEFAULT_GROUPS, show_default=True, help="groups YAML with a simulator section")
@click.option("--customers", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="results .parquet or .csv")
def simulate_ab_command(experiment_id, groups, customers, seed, out) -> None:
    """Results for an exported experiment from the simulator's customer groups (for `genshop import ab-results`)."""
    from genshop.experiments.simulation import AbSimulationConfig, simulate_ab
    from reward.groups import GroupsConfigError

    _, _, manifest = _experiment(experiment_id)
    try:
        frame = simulate_ab(manifest, AbSimulationConfig(groups=groups, customers=customers, seed=seed))
    except GroupsConfigError as exc:
        raise _invalid(exc) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False) if out.suffix.lower() == ".csv" else frame.to_parquet(out, index=False)
    stdout.print(f"{len(frame)} result rows ({int(frame['impressions'].sum())} impressions, "
                 f"{int(frame['clicks'].sum())} clicks) → {out}")
