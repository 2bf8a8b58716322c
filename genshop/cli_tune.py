"""Click commands for preference tuning: ``genshop tune`` (train a group's LoRA) and
``genshop tune eval`` (tuned vs base on held-out briefs). Thin faces over ``genshop.tuning``."""

from __future__ import annotations

from pathlib import Path

import click

from genshop.cli_reward import FILE, FOLDER, InvalidInput, stdout
from genshop.cli_train import _progress_bar, stage_progress


@click.group("tune", invoke_without_command=True)
@click.option("--group", help="the customer group to tune for")
@click.option("--briefs", type=FILE, help="YAML list of briefs whose prompts are tuned on")
@click.option("--reward", type=FOLDER, help="group reward model folder")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default=None, help="generation preset of the base pipeline (default: GENSHOP_PRESET)")
@click.option("--objective", type=click.Choice(["dpo", "listwise"]), default="dpo", show_default=True)
@click.option("--preferences", type=FILE, multiple=True,
              help="offline: impressions Parquet whose items are image files (e.g. an A/B import), instead of sampling")
@click.option("--candidates", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--steps", "steps_per_round", type=click.IntRange(min=1), default=100, show_default=True,
              help="training steps per round")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-4, show_default=True)
@click.option("--beta", type=float, default=None,
              help="the objective's beta (default: 5000 for ε/v-prediction, 500 for flow matching)")
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--inference-steps", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None)
@click.pass_context
def tune(context, **options) -> None:
    """Train the group's LoRA on the reward model's preferences (Diffusion-DPO or listwise); resumes.

    Needs --group, --briefs, --reward and --out; `genshop tune eval` compares a LoRA with the base."""
    from pydantic import ValidationError

    from genshop.briefs import BriefError
    from genshop.tuning.tune import TuneConfig
    from genshop.tuning.tune import tune as run

    if context.invoked_subcommand is not None:
        return
    missing = [f"--{name}" for name in ("group", "briefs", "reward", "out") if options[name] is None]
    if missing:
        raise InvalidInput(f"missing option(s): {', '.join(missing)}")
    options["preferences"] = list(options["preferences"])
    try:
        config = TuneConfig(**options)
        with _progress_bar() as bar:
            on_progress = stage_progress(bar)
            adapter = run(config, lambda stage, done, total, metrics: on_progress(stage, done, total))
    except (BriefError, ValidationError) as exc:
        raise InvalidInput(str(exc)) from None
    stdout.print(f"adapter: {adapter}\ncurves: {config.out / 'curves.png'}\n"
                 f"samples: {config.out / 'samples-before.png'}, {config.out / 'samples-after.png'}")


@tune.command("eval")
@click.option("--group", required=True)
@click.option("--adapter", type=FOLDER, required=True, help="the group's LoRA folder (OUT/adapter of genshop tune)")
@click.option("--briefs", type=FILE, required=True, help="held-out briefs (YAML list)")
@click.option("--reward", type=FOLDER, required=True, help="the reward model the tuning used")
@click.option("--judge", type=FOLDER, default=None, help="default: the bundle's evaluation judge")
@click.option("--preset", default=None)
@click.option("--variants", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--inference-steps", type=click.IntRange(min=1), default=None)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG: base and tuned rows")
def tune_eval(group, adapter, briefs, reward, judge, preset, variants, inference_steps, json_out, grid) -> None:
    """Tuned vs base per brief: reward and held-out win rates, fidelity and diversity limits."""
    from rich.table import Table

    from genshop.tuning.evaluation import TARGETS, TuneEvalConfig, evaluate_tuning

    fields = {"group": group, "adapter": adapter, "briefs": briefs, "reward": reward, "preset": preset,
              "variants": variants, "inference_steps": inference_steps, "grid": grid}
    if judge:
        fields["judge"] = judge
    with _progress_bar() as bar:
        on_progress = stage_progress(bar)
        report = evaluate_tuning(TuneEvalConfig(**fields), lambda done, total: on_progress("briefs", done, total))
    table = Table("measure", "base", "tuned", "target", title=f"group {group}: {report.briefs} held-out briefs")
    table.add_row("win rate, training reward", "", f"{report.reward_win_rate:.3f}", "")
    table.add_row("win rate, held-out judgement", "", f"{report.heldout_win_rate:.3f}",
                  f">= {TARGETS['heldout_win_rate']}")
    for column, value in report.fidelity_base.items():
        table.add_row(f"fidelity: {column}", f"{value:.3f}", f"{report.fidelity_tuned[column]:.3f}",
                      f"drop <= {TARGETS['fidelity_drop_points']:g} pts")
    table.add_row("diversity (mean pairwise CLIP distance)", f"{report.diversity_base:.4f}",
                  f"{report.diversity_tuned:.4f} ({report.diversity_ratio:.2f}x)", f">= {TARGETS['diversity_ratio']}x")
    stdout.print(table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.model_dump_json(indent=2))
        stdout.print(f"report: {json_out}")
