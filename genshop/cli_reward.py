"""Click commands for the group reward model: the ``reward`` group (``import``, ``train``, ``eval``,
``score``) and the ``simulate`` group (``impressions``).

Thin faces: each builds a config, calls one job from ``reward/`` with a progress callback
that drives a rich progress bar, and prints the result. Invalid input (a bad impressions
file, a bad groups file) exits with status 2 and every offending row on stderr.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click
from rich.table import Table

from genshop.cli_train import _progress_bar, stage_progress, stderr, stdout


FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
DEFAULT_GROUPS = Path(__file__).resolve().parent.parent / "configs" / "groups.yaml"


class InvalidInput(click.ClickException):
    exit_code = 2


def _invalid_input(exc: Exception) -> InvalidInput:
    from reward.impressions import MAX_LISTED_ISSUES, ImpressionValidationError

    if isinstance(exc, ImpressionValidationError):
        for issue in exc.issues[:MAX_LISTED_ISSUES]:
            stderr.print(f"  {issue}", highlight=False, markup=False, soft_wrap=True)
        if len(exc.issues) > MAX_LISTED_ISSUES:
            stderr.print(f"  ... and {len(exc.issues) - MAX_LISTED_ISSUES} more", highlight=False, soft_wrap=True)
        return InvalidInput(f"{exc.source}: {len(exc.issues)} invalid row(s), nothing imported")
    return InvalidInput(str(exc))


def _embedding_config(clip: Path | None, device: str):
    from genshop.embedding import EmbeddingConfig

    return None if clip is None else EmbeddingConfig.for_directory(clip, device=device)


# ================================================================ genshop reward

@click.group("reward")
def reward() -> None:
    """The group reward model: import preference data, train, evaluate, score images."""


@reward.command("import")
@click.argument("source", type=FILE)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="impressions Parquet (format v1)")
@click.option("--catalog", type=FILE, multiple=True, help="catalog parquet whose product ids are known items (repeatable)")
@click.option("--groups", type=FILE, default=DEFAULT_GROUPS, show_default=True, help="groups YAML: the known group ids")
@click.option("--append", is_flag=True, help="add to an existing --out (ids must not repeat)")
@click.option("--source-default", type=click.Choice(["simulated", "ab_import", "manual"]), default=None,
              help="source for rows that do not say")
@click.option("--images-root", "images_roots", type=FOLDER, multiple=True,
              help="folder the image items must lie in (repeatable; default: the source file's folder)")
@click.option("--columns", default="", help="the file's own column names: FIELD=COLUMN,... e.g. brief=prompt,items=shown")
def import_command(source, out, catalog, groups, append, source_default, images_roots, columns) -> None:
    """Validate a JSONL, CSV or Parquet file of impressions and store it as impressions Parquet (all or nothing).

    Items are catalog product ids (with --catalog) or paths of images inside the --images-root
    folders; numbers must be finite and strings bounded (reward.impressions names the limits)."""
    from genshop.catalog_data import read_catalog
    from reward.groups import GroupsConfigError, load_groups
    from reward.impressions import (ImpressionFormatError, ImpressionValidationError, import_impressions,
                                    parse_column_mapping)

    try:
        mapping = parse_column_mapping(columns)
        known_groups = {g.id for g in load_groups(groups)}
        known_items = set(read_catalog(catalog, with_images=False)["product_id"]) if catalog else None
        result = import_impressions(source, out, known_items, known_groups, append=append, default_source=source_default,
                                    image_roots=list(images_roots) or None, columns=mapping)
    except (ImpressionValidationError, ImpressionFormatError, GroupsConfigError) as exc:
        raise _invalid_input(exc) from None
    stdout.print(f"imported {result.imported} impressions into {result.out} ({result.total} in the file)")


@reward.command("train")
@click.option("--impressions", type=FILE, multiple=True, required=True, help="impressions Parquet (repeatable)")
@click.option("--catalog", type=FILE, multiple=True,
              help="catalog parquet with the images of items named by product id (items that are image paths need none)")
@click.option("--clip", type=FOLDER, required=True, help="CLIP folder (open_clip or transformers), e.g. runs/clip-mini/model")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="run folder: model/, log.jsonl, curves.png")
@click.option("--groups", type=FILE, default=DEFAULT_GROUPS, show_default=True)
@click.option("--config", "recipe", type=FILE, default=None, help="training recipe JSON (RewardTrainingConfig fields)")
@click.option("--group-agnostic", is_flag=True, help="train the group-agnostic baseline of the same size")
@click.option("--split", type=click.Choice(["items", "impressions"]), default=None,
              help="hold out items (default) or impressions (few items, e.g. an A/B import)")
@click.option("--loss", type=click.Choice(["listwise", "pairwise", "mixed"]), default=None)
@click.option("--epochs", "max_epochs", type=int, default=None, help="at most this many epochs (early stopping may end sooner)")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", "learning_rate", type=float, default=None)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--device", default="auto", show_default=True, help="device of the CLIP that embeds the items")
@click.option("--seed", type=int, default=None)
def train_command(impressions, catalog, clip, out_dir, groups, recipe, group_agnostic, split, loss, max_epochs, batch_size,
                  learning_rate, cache_dir, threads, device, seed) -> None:
    """Train a group reward model on impressions (frozen CLIP features, early stopping on held-out items)."""
    from reward.training import RewardTrainingConfig, train_reward

    fields = json.loads(recipe.read_text(encoding="utf-8")) if recipe else {}
    overrides = {"loss": loss, "max_epochs": max_epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                 "cache_dir": cache_dir, "threads": threads, "seed": seed, "split": split}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if group_agnostic:
        fields["use_groups"] = False
    config = RewardTrainingConfig(impressions=list(impressions), catalog=list(catalog), groups=groups, out_dir=out_dir,
                                  embedding=_embedding_config(clip, device), **fields)
    with _progress_bar() as bar:
        task = bar.add_task("train reward", total=None, detail="")

        def on_progress(p) -> None:
            if p.notice:
                bar.console.print(p.message, highlight=False, markup=False)
            detail = p.message
            if p.loss is not None:
                detail = f"{p.message + '  ' if p.message else ''}epoch {p.epoch:.2f}  loss {p.loss:.3f}"
                if p.val_loss is not None:
                    detail += f"  held-out loss {p.val_loss:.3f}"
                if p.val_accuracy is not None:
                    detail += f"  held-out acc {p.val_accuracy:.3f}"
            bar.update(task, total=p.total_steps or None, completed=p.step, detail=detail)

        model_dir = train_reward(config, on_progress)
    stdout.print(f"model: {model_dir}\ncurves: {out_dir / 'curves.png'}")


def _eval_table(report) -> Table:
    table = Table("model", "accuracy", "× Bayes", "disagree (any)", "disagree (vs pop.)", "log-loss", "log-loss w/ none",
                  "ECE", *[f"group {g}" for g in report.groups],
                  title=f"{report.impressions} impressions ({report.impressions_with_choice} with a choice), "
                        f"{report.items} items")

    def f(value):
        return "" if value is None else f"{value:.4f}"

    for name, m in report.models.items():
        table.add_row(name, f(m.accuracy), f(m.bayes_fraction), f(m.accuracy_disagree_any), f(m.accuracy_disagree_population),
                      f(m.log_loss), f(m.log_loss_with_none), f(m.calibration_error),
                      *[f(m.accuracy_by_group.get(g)) for g in report.groups])
    return table


@reward.command("eval")
@click.argument("model", type=FOLDER)
@click.option("--impressions", type=FILE, multiple=True, required=True, help="held-out impressions Parquet (repeatable)")
@click.option("--catalog", type=FILE, multiple=True, required=True, help="catalog parquet with the items' images")
@click.option("--baseline", type=FOLDER, default=None, help="group-agnostic reward model folder to compare with")
@click.option("--clip", type=FOLDER, default=None, help="default: the CLIP recorded in the model")
@click.option("--no-clip-baseline", is_flag=True, help="skip the plain CLIP image–brief baseline")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="embedding cache (default: $GENSHOP_HOME/cache/reward-embeddings)")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="default: <model>/../eval-<impressions stem>.json")
@click.option("--device", default="auto", show_default=True)
@click.option("--understanding", type=FOLDER, default=None,
              help="with --simulator: add the attribute_reader ceiling (the exact hidden utilities applied to the "
                   "attributes these heads read from the same image features)")
@click.option("--simulator", type=FILE, default=None, help="the groups YAML whose hidden utilities made the impressions")
def eval_command(model, impressions, catalog, baseline, clip, no_clip_baseline, cache_dir, json_out, device,
                 understanding, simulator) -> None:
    """Accuracy, per-group accuracy, log-loss, calibration, fraction of Bayes-optimal, against the baselines."""
    from reward.evaluation import RewardEvalConfig, evaluate_reward

    if cache_dir is None:  # never beside the model: the shipped one lives inside the installed package
        from genshop.settings import get_settings

        cache_dir = get_settings().home / "cache" / "reward-embeddings"
    config = RewardEvalConfig(model=model, baseline=baseline, impressions=list(impressions), catalog=list(catalog),
                              embedding=_embedding_config(clip, device), cache_dir=cache_dir,
                              clip_baseline=not no_clip_baseline, understanding=understanding, simulator=simulator)
    with _progress_bar() as bar:
        report = evaluate_reward(config, stage_progress(bar))
    stdout.print(_eval_table(report))
    for note in report.notes:
        stderr.print(f"note: {note}", style="yellow", highlight=False, markup=False)
    passed = report.passed()
    for name, target in report.targets.items():
        stdout.print(f"{name}: {report.measured[name]:.4f} (target >= {target}) {'PASS' if passed[name] else 'FAIL'}")
    for name, value in report.measured.items():
        if name not in report.targets:
            stdout.print(f"{name}: {value:.4f}")
    if report.items_seen_in_training is not None:
        stdout.print(f"items seen in training: {report.items_seen_in_training} of {report.items}")
    json_out = json_out or model.parent / f"eval-{Path(impressions[0]).stem}.json"
    json_out.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    stdout.print(f"report: {json_out}")


@reward.command("score")
@click.argument("images", type=FILE, nargs=-1, required=True)
@click.option("--model", "model_dir", type=FOLDER, required=True, help="reward model folder")
@click.option("--group", "groups", multiple=True, required=True, help="group id (repeatable)")
@click.option("--brief", required=True, help="the brief / prompt text")
@click.option("--clip", type=FOLDER, default=None, help="default: the CLIP recorded in the model")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def score_command(images, model_dir, groups, brief, clip, batch_size, device, as_json) -> None:
    """Score image files for a brief and each group (batched). Rewards are logits: compare within one group."""
    from reward.scoring import UnknownGroupWarning, load_scorer, score_images

    embedding = _embedding_config(clip, device)
    model, embedder = load_scorer(model_dir, device, embedding)
    embedder.batch_size = batch_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnknownGroupWarning)
        scores = score_images(model, embedder, list(images), brief, list(groups))
    for warning in caught:
        stderr.print(f"warning: {warning.message}", highlight=False, markup=False)
    if as_json:
        click.echo(json.dumps({"brief": brief, "images": [str(p) for p in images],
                               "groups": {g: s.model_dump() for g, s in scores.items()}}, indent=2))
        return
    table = Table("image", *[f"{g}" + (" (as population)" if s.fallback else "") for g, s in scores.items()],
                  title=f"rewards for {brief!r} (logits; probability if shown together in brackets)")
    for i, path in enumerate(images):
        table.add_row(str(path), *[f"{s.rewards[i]:+.3f} ({s.probabilities[i]:.2f})" for s in scores.values()])
    stdout.print(table)


@reward.command("fit-attributes")
@click.argument("impressions", type=FILE, nargs=-1, required=True)
@click.option("--catalog", type=FILE, multiple=True, required=True,
              help="catalog parquet of the products the impressions show (repeatable)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--reader", type=click.Choice(["top-tuned", "zero-shot"]), default="top-tuned", show_default=True,
              help="the enrich stage's classifier that reads a generated image's attributes when it is scored")
@click.option("--brief-article-type", type=click.Choice(["fixed", "read"]), default="fixed", show_default=True,
              help="a brief that names its article type: score images as that type (only the colour is read), or read it")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="full-batch Adam steps")
def fit_attributes_command(impressions, catalog, out, reader, brief_article_type, steps) -> None:
    """A group reward over catalog attributes (a conditional logit on the impressions), for `genshop tune --reward`."""
    from reward.attribute_reward import fit_attribute_reward
    from reward.impressions import read_impression_files
    from reward.simulator import catalog_attributes

    frame = read_impression_files(impressions)
    items = catalog_attributes(list(catalog))
    try:
        with _progress_bar() as bar:
            on_progress = stage_progress(bar)
            model = fit_attribute_reward(frame, items, steps=steps, reader=reader, brief_article_type=brief_article_type,
                                         progress=lambda done, total: on_progress("fit", done, total))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    model.save_pretrained(out)
    stdout.print(f"{len(frame)} impressions of {len(items)} products, {len(model.config.features)} features, "
                 f"groups {', '.join(model.config.groups)}: {out}")


# ================================================================ genshop simulate

@click.group("simulate")
def simulate() -> None:
    """Simulated data for offline runs, tests and demos."""


@simulate.command("impressions")
@click.option("--catalog", type=FILE, multiple=True, required=True, help="catalog parquet (repeatable)")
@click.option("--groups", type=FILE, default=DEFAULT_GROUPS, show_default=True, help="groups YAML with a simulator section")
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="number of impressions")
@click.option("--k", "k", type=click.IntRange(min=2), default=4, show_default=True, help="items shown together")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help=".parquet or .jsonl")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pools", type=click.IntRange(min=1), default=10, show_default=True,
              help="item pools; the candidates of one impression share a pool (see reward.splits)")
@click.option("--json-report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="default: <out>.report.json")
def simulate_impressions_command(catalog, groups, n, k, out, seed, pools, json_report) -> None:
    """Impressions drawn from groups with hidden utilities; reports the Bayes-optimal accuracy (the ceiling)."""
    from reward.groups import GroupsConfigError
    from reward.impressions import write_impressions, write_impressions_jsonl
    from reward.simulator import SimulationConfig, simulate_impressions

    config = SimulationConfig(catalog=list(catalog), groups=groups, n=n, k=k, seed=seed, pools=pools,
                              id_prefix=f"sim-{out.stem}")
    try:
        with _progress_bar() as bar:
            on_progress = stage_progress(bar)  # one bar, however often it reports
            frame, report = simulate_impressions(config, lambda done, total: on_progress("simulate", done, total))
    except GroupsConfigError as exc:
        raise _invalid_input(exc) from None
    (write_impressions_jsonl if out.suffix.lower() in (".jsonl", ".ndjson") else write_impressions)(frame, out)
    json_report = json_report or out.with_name(out.name + ".report.json")
    json_report.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    table = Table("", "value", title=f"{n} impressions of K = {k} from {report.items} items")
    table.add_row("Bayes-optimal accuracy (expected)", f"{report.bayes_accuracy:.4f}")
    table.add_row("Bayes-optimal accuracy (on these draws)", f"{report.bayes_accuracy_realized:.4f}")
    for g, value in report.bayes_accuracy_by_group.items():
        table.add_row(f"  group {g}", f"{value:.4f}")
    table.add_row("best group-agnostic accuracy (expected)", f"{report.population_accuracy:.4f}")
    table.add_row("uniform guess", f"{report.random_accuracy:.4f}")
    table.add_row("no-choice rate", f"{report.no_choice_rate:.4f}")
    table.add_row("groups disagree (any two favourites differ)", f"{report.disagree_any_share:.4f}")
    table.add_row("group's favourite is not the population's", f"{report.disagree_population_share:.4f}")
    stdout.print(table)
    stdout.print(f"impressions: {out}\nreport: {json_report}")


def main() -> None:
    """``python -m genshop.cli_reward reward ...`` / ``... simulate ...`` until the groups are in ``genshop.cli``."""
    click.Group(commands={"reward": reward, "simulate": simulate})()


if __name__ == "__main__":
    main()
