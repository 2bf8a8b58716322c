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
@click.option("--reward", type=FOLDER,
              help="group reward folder: a CLIP reward model, or an attribute reward (genshop reward fit-attributes)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default=None, help="generation preset of the base pipeline (default: GENSHOP_PRESET)")
@click.option("--objective", type=click.Choice(["dpo", "listwise", "kto"]), default="dpo", show_default=True,
              help="Diffusion-DPO (best vs worst), Plackett-Luce (the ranking), or Diffusion-KTO (single images "
                   "marked good or bad: a ranking's top and bottom, or clicks/purchases/choices of --preferences)")
@click.option("--preferences", type=FILE, multiple=True,
              help="offline: impressions Parquet whose items are image files (e.g. an A/B import), instead of sampling")
@click.option("--rankings-from", type=FILE, default=None,
              help="round 0: re-rank another run's base-model candidates (OUT/rankings-round000.safetensors) "
                   "for this group instead of sampling them again")
@click.option("--candidates", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--steps", "steps_per_round", type=click.IntRange(min=1), default=100, show_default=True,
              help="training steps per round")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-4, show_default=True)
@click.option("--beta", type=float, default=None,
              help="the objective's beta (default: 5000 for ε/v-prediction, 500 for flow matching)")
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--min-margin", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="guard: drop sampled rankings whose best and worst rewards differ by less")
@click.option("--on-brief", is_flag=True,
              help="guard: candidates read (--on-brief-reader) as the brief's article type rank above the others")
@click.option("--on-brief-reader", type=click.Choice(["zero-shot", "top-tuned", "both"]),
              default="top-tuned", show_default=True,
              help="the on-brief guard's classifier (top-tuned: the understanding folder's heads; both: where they agree)")
@click.option("--validation-briefs", type=click.IntRange(min=0), default=0, show_default=True,
              help="guard: hold this many briefs out; keep the adapter their reward was best with (early stopping)")
@click.option("--validate-every", type=click.IntRange(min=1), default=None,
              help="with --validation-briefs: validate every this many steps (default: each round's end)")
@click.option("--inference-steps", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None)
@click.pass_context
def tune(context, **options) -> None:
    """Train the group's LoRA on the reward model's preferences (Diffusion-DPO, listwise or KTO); resumes.

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


def _best_of(context, parameter, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 4,8,16") from None
    if any(n < 1 for n in numbers):
        raise click.BadParameter("each N must be at least 1")
    return numbers


@tune.command("scale")
@click.argument("adapter", type=FOLDER)
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), required=True,
              help="the LoRA update times this (< 1: toward the base model)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def tune_scale(adapter, scale, out) -> None:
    """Write a copy of a group LoRA with its update scaled (a KL-like knob after training)."""
    from genshop.adapters import LORA_WEIGHTS, scale_group_adapter

    if not (adapter / LORA_WEIGHTS).is_file():
        raise InvalidInput(f"adapter: {adapter} has no {LORA_WEIGHTS}")
    stdout.print(f"adapter: {scale_group_adapter(adapter, scale, out)}")


@tune.command("average")
@click.argument("adapters", type=FOLDER, nargs=-1, required=True)
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="cut the mean update to this rank (SVD; default: exact, the runs' ranks summed)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def tune_average(adapters, rank, out) -> None:
    """Write one LoRA whose update is the mean of several runs' (same group, base model and modules;
    e.g. tuned with other --seed): a weight average that reward-hacks less than any one run."""
    from genshop.adapters import LORA_WEIGHTS, average_group_adapters

    missing = [str(a) for a in adapters if not (a / LORA_WEIGHTS).is_file()]
    if missing:
        raise InvalidInput(f"adapters: {', '.join(missing)} has no {LORA_WEIGHTS}")
    try:
        stdout.print(f"adapter: {average_group_adapters(list(adapters), out, rank)}")
    except ValueError as error:
        raise InvalidInput(str(error)) from error


@tune.command("eval")
@click.option("--group", "groups", required=True, multiple=True,
              help="the group (repeat for several: the base and the ceilings only, images shared)")
@click.option("--adapter", type=FOLDER, default=None,
              help="the group's LoRA folder (OUT/adapter of genshop tune); none: the base and the ceilings only")
@click.option("--briefs", type=FILE, required=True, help="held-out briefs (YAML list)")
@click.option("--reward", type=FOLDER, required=True, help="the reward model the tuning used")
@click.option("--judge", type=FOLDER, default=None, help="default: the bundle's evaluation judge")
@click.option("--preset", default=None)
@click.option("--variants", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--best-of", default="4,8,16", show_default=True, callback=_best_of,
              help="N of the best-of-N ceilings, by the training reward and by the held-out judgement ('' for none)")
@click.option("--pool", type=click.IntRange(min=2), default=None,
              help="base images per brief the best-of-N picks are drawn from (default: the largest N)")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="pool images per pipeline call")
@click.option("--inference-steps", type=click.IntRange(min=1), default=None)
@click.option("--threads", type=int, default=None)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG: base and tuned rows")
def tune_eval(groups, adapter, briefs, reward, judge, preset, variants, best_of, pool, batch_size, inference_steps,
              threads, json_out, grid) -> None:
    """Tuned vs base per brief: reward and held-out win rates, fidelity and diversity limits, and the
    best-of-N ceilings (by the training reward, and by the held-out judgement: the oracle)."""
    import json

    import torch
    from rich.table import Table

    from genshop.tuning.evaluation import TARGETS, TuneEvalConfig, evaluate_groups

    if adapter is not None and len(groups) > 1:
        raise InvalidInput("--adapter is evaluated for one --group")
    if threads:
        torch.set_num_threads(threads)
    fields = {"group": groups[0], "adapter": adapter, "briefs": briefs, "reward": reward, "preset": preset,
              "variants": variants, "inference_steps": inference_steps, "grid": grid, "best_of": best_of,
              "pool": pool, "batch_size": batch_size}
    if judge:
        fields["judge"] = judge
    try:
        config = TuneEvalConfig(**fields)
        with _progress_bar() as bar:
            on_progress = stage_progress(bar)
            reports = evaluate_groups(config, list(groups), lambda done, total: on_progress("briefs", done, total))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    for report in reports:
        tuned = report.heldout_win_rate is not None
        table = Table("measure", "base", "tuned" if tuned else "", "target",
                      title=f"group {report.group}: {report.briefs} held-out briefs")
        if tuned:
            table.add_row("win rate, training reward", "", f"{report.reward_win_rate:.3f}", "")
            table.add_row("win rate, held-out judgement", "", f"{report.heldout_win_rate:.3f}",
                          f">= {TARGETS['heldout_win_rate']}")
        table.add_row("mean held-out utility", f"{report.mean_utility_base:.3f}",
                      f"{report.mean_utility_tuned:.3f}" if tuned else "", "")
        for column, value in report.fidelity_base.items():
            table.add_row(f"fidelity: {column}", f"{value:.3f}",
                          f"{report.fidelity_tuned[column]:.3f}" if tuned else "",
                          f"drop <= {TARGETS['fidelity_drop_points']:g} pts")
        table.add_row("diversity (mean pairwise CLIP distance)", f"{report.diversity_base:.4f}",
                      f"{report.diversity_tuned:.4f} ({report.diversity_ratio:.2f}x)" if tuned else "",
                      f">= {TARGETS['diversity_ratio']}x")
        stdout.print(table)
        if report.ceilings:
            ceilings = Table("best-of-N from the base", "held-out win rate", "reward win rate", "mean utility",
                             "fidelity drop (pts)", title=f"group {report.group}: ceilings (pool of {report.pool} "
                             "base images per brief)")
            for c in report.ceilings:
                ceilings.add_row(f"best-of-{c.n} by {'reward' if c.selector == 'reward' else 'oracle (held-out)'}",
                                 f"{c.heldout_win_rate:.3f}", f"{c.reward_win_rate:.3f}", f"{c.mean_utility:.3f}",
                                 f"{c.fidelity_drop_points:.1f}")
            stdout.print(ceilings)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = reports[0].model_dump() if len(reports) == 1 else [r.model_dump() for r in reports]
        json_out.write_text(json.dumps(payload, indent=2, default=str))
        stdout.print(f"report: {json_out}")
