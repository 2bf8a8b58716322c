"""Click commands for bias audits and explanations: ``genshop audit reward``, ``genshop audit generator``
and ``genshop explain``.

Thin faces: each builds a config, calls one job from ``genshop.audit`` or ``reward.explanation``
with a progress callback, prints a table and writes the audit (JSON + PNG) as the latest of its
kind (``$GENSHOP_HOME/audits``, which ``genshop serve`` shows). Invalid input exits with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from genshop.cli_reward import DEFAULT_GROUPS, FILE, FOLDER, InvalidInput
from genshop.cli_train import _progress_bar, stage_progress, stderr, stdout
from genshop.settings import DEFAULT_TAXONOMY, get_settings

SHARE = click.FloatRange(0, 1, min_open=True, max_open=True)


@click.group("audit")
def audit() -> None:
    """Bias audits: what the reward model and the generator favour for each customer group."""


def _run(job, config, out: Path | None, as_json: bool) -> None:
    """Run an audit job with progress bars, then print it and save it as the latest of its kind."""
    from genshop.audit.report import save_audit
    from genshop.audit.reward_audit import AuditInputError

    try:
        with _progress_bar() as bar:
            report = job(config, stage_progress(bar))
    except AuditInputError as exc:
        raise InvalidInput(str(exc)) from None
    json_path, png_path = save_audit(report, out or get_settings().home / "audits")
    if as_json:
        click.echo(report.model_dump_json())
        return
    table = Table("group", "items", *[a.replace("_", " ") for a in report.groups[0].attributes],
                  title=f"{report.kind} audit: values favoured / disfavoured against the catalog (95% Wilson)")
    for group in report.groups:
        cells = []
        for shares in group.attributes.values():
            telling = [s for s in shares if max(s.share, s.catalog_share) >= 0.02]  # the JSON has every value
            favoured = [f"+{s.value} {s.share:.0%} ({s.catalog_share:.0%})" for s in telling if s.verdict == "favoured"]
            disfavoured = [f"-{s.value} {s.share:.0%} ({s.catalog_share:.0%})" for s in telling
                           if s.verdict == "disfavoured"]
            cells.append("\n".join(favoured[:3] + disfavoured[:2]) or "as catalog")
        table.add_row(group.group_id, str(group.items), *cells)
    stdout.print(table)
    disparities = Table("attribute", "value", "group", "share", "other group", "share", "difference (95% CI)",
                        title=f"disparities between groups of at least {report.threshold:.0%} "
                              f"({len(report.disparities)} flagged)")
    for d in report.disparities[:15]:
        disparities.add_row(d.attribute, d.value, d.group, f"{d.share:.1%}", d.other_group, f"{d.other_share:.1%}",
                            f"{d.difference:+.1%} ({d.low:+.1%} to {d.high:+.1%})")
    stdout.print(disparities)
    for note in report.notes:
        stderr.print(f"note: {note}", style="yellow", highlight=False, markup=False)
    stdout.print(f"audit: {json_path}\nchart: {png_path}", highlight=False, markup=False)


@audit.command("reward")
@click.option("--model", type=FOLDER, default=None, help="reward model folder (default: GENSHOP_REWARD_MODEL)")
@click.option("--catalog", type=FILE, multiple=True, required=True, help="labelled catalog parquet (the val split)")
@click.option("--group", "groups", multiple=True, help="group id (repeatable; default: every group the model knows)")
@click.option("--top-share", type=SHARE, default=0.1, show_default=True,
              help="the share of each sub category counted as top-scored")
@click.option("--threshold", type=SHARE, default=0.1, show_default=True, help="flag disparities of at least this share")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder of the latest audits (default: $GENSHOP_HOME/audits)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def audit_reward_command(model, catalog, groups, top_share, threshold, out, as_json) -> None:
    """The share of the reward's top-scored catalog items per attribute value and group, against the catalog's."""
    from genshop.audit.reward_audit import RewardAuditConfig, audit_reward

    settings = get_settings()
    model = model or settings.reward_model
    if model is None:
        raise InvalidInput("--model: no reward model (GENSHOP_REWARD_MODEL is 'off')")
    config = RewardAuditConfig(model=model, catalog=list(catalog), groups=list(groups), top_share=top_share,
                               threshold=threshold, cache_dir=settings.home / "cache" / "reward-embeddings")
    _run(audit_reward, config, out, as_json)


@audit.command("generator")
@click.option("--catalog", type=FILE, multiple=True, required=True, help="labelled catalog parquet (the val split)")
@click.option("--group", "groups", multiple=True, help="group id (repeatable; default: the groups of configs/groups.yaml)")
@click.option("--briefs", type=FILE, default=None, help="briefs YAML list (default: configs/tuning/briefs-heldout.yaml)")
@click.option("--variants", type=click.IntRange(1, 64), default=4, show_default=True, help="images per brief and group")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="denoising steps (default: the preset's)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--preset", default=None, help="generation preset (default: GENSHOP_PRESET)")
@click.option("--understanding", type=FOLDER, default=None,
              help="`genshop understand fit` folder with the heads (default: GENSHOP_UNDERSTANDING)")
@click.option("--clip", type=FOLDER, default=None, help="its CLIP (default: GENSHOP_EMBEDDING_MODEL)")
@click.option("--threshold", type=SHARE, default=0.1, show_default=True, help="flag disparities of at least this share")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder of the latest audits (default: $GENSHOP_HOME/audits)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def audit_generator_command(catalog, groups, briefs, variants, steps, seed, preset, understanding, clip, threshold,
                            out, as_json) -> None:
    """The share of each group's generated images per attribute value (read by the understanding heads),
    against the catalog's; each group's LoRA from GENSHOP_ADAPTERS, else the base model."""
    from genshop.audit.generator_audit import DEFAULT_BRIEFS, GeneratorAuditConfig, audit_generator
    from genshop.embedding import EmbeddingConfig
    from reward.groups import load_groups

    settings = get_settings()
    understanding = understanding or settings.understanding
    clip = clip or settings.embedding_model
    if understanding is None or clip is None:
        raise InvalidInput("--understanding / --clip: the audit reads the images with the understanding heads and "
                           "their CLIP (GENSHOP_UNDERSTANDING / GENSHOP_EMBEDDING_MODEL are 'off')")
    config = GeneratorAuditConfig(
        groups=list(groups) or [g.id for g in load_groups(DEFAULT_GROUPS)], catalog=list(catalog),
        embedding=EmbeddingConfig.for_directory(clip, device=settings.device), understanding=understanding,
        briefs=briefs or DEFAULT_BRIEFS, preset=preset, variants=variants, steps=steps, seed=seed, threshold=threshold)
    _run(audit_generator, config, out, as_json)


@click.command("explain")
@click.argument("images", type=FILE, nargs=-1)
@click.option("--item", "item_id", default=None, help="a stored item's id instead of image files: its brief and groups")
@click.option("--brief", default=None, help="the brief / prompt text (with image files)")
@click.option("--group", "groups", multiple=True, help="group id (repeatable; with --item default: the brief's groups)")
@click.option("--model", type=FOLDER, default=None, help="reward model folder (default: GENSHOP_REWARD_MODEL)")
@click.option("--understanding", type=FOLDER, default=None,
              help="`genshop understand fit` folder (default: GENSHOP_UNDERSTANDING; none: zero-shot)")
@click.option("--alternatives", type=click.IntRange(1, 10), default=3, show_default=True,
              help="the catalog's most common other values each attribute is swapped to")
@click.option("--json", "as_json", is_flag=True)
def explain(images, item_id, brief, groups, model, understanding, alternatives, as_json) -> None:
    """Which attributes an image's reward rests on, per group: the reward with each attribute the understanding
    reads swapped for the catalog's typical alternatives."""
    from genshop.understanding.taxonomy import load_taxonomy
    from reward.explanation import load_explainer

    settings = get_settings()
    if bool(images) == bool(item_id):
        raise InvalidInput("images / --item: give image files or one --item, not both or neither")
    if item_id:
        from genshop.generation import build_prompt
        from genshop.store import open_store

        store = open_store()
        found = store.get_items([item_id])
        if not found:
            raise InvalidInput(f"--item: no generated item with id {item_id!r}")
        record = store.get_brief(found[0].brief_id)
        images, brief = [store.images.path(found[0].image_path)], build_prompt(record.brief)
        groups = groups or tuple(record.brief.groups)
    if not brief:
        raise InvalidInput("--brief: required with image files")
    if not groups:
        raise InvalidInput("--group: at least one group (the item's brief targets none)")
    model = model or settings.reward_model
    if model is None:
        raise InvalidInput("--model: no reward model (GENSHOP_REWARD_MODEL is 'off')")
    explainer = load_explainer(model, load_taxonomy(DEFAULT_TAXONOMY), understanding or settings.understanding)
    results = explainer.explain_images(list(images), brief, list(groups), alternatives)
    if as_json:
        click.echo(json.dumps([{"image": str(path), "explanations": {g: e.model_dump() for g, e in r.items()}}
                               for path, r in zip(images, results)], indent=2))
        return
    for path, per_group in zip(images, results):
        table = Table("group", "reward", "explanation (effect of each attribute read: log-odds against the "
                                         "catalog's usual alternatives)", title=str(path))
        for group_id, explanation in per_group.items():
            table.add_row(group_id, f"{explanation.reward:+.3f}", explanation.summary)
        stdout.print(table)
