"""``genshop demo``: the product tour on the embedded default, no Redis needed.

Runs the demo briefs through the in-process worker (the steps the Celery tasks run:
generate, then score for the target groups when a reward model is configured), prints
what was made and writes a contact sheet PNG with each variant's scores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from PIL import Image

from genshop.briefs import parse_brief
from genshop.generation import build_prompt
from genshop.contact_sheet import save_contact_sheet
from genshop.local_worker import load_local_models, run_locally
from genshop.service import Progress, brief_with_items, submit_brief
from genshop.settings import get_settings
from genshop.store import BriefRecord, Store


def demo_briefs():
    path = get_settings().configs_dir / "demo-briefs.yaml"
    return [parse_brief(data, f"{path}[{i}]") for i, data in enumerate(yaml.safe_load(path.read_text()))]


def run_demo(
    out_dir: Path,
    preset: str,
    progress_for: Callable[[BriefRecord], Callable[[Progress], None]] | None = None,
) -> tuple[list[BriefRecord], Path]:
    """Generate the demo briefs into ``out_dir``: its own SQLite store, images and index, so the
    user's store and index are left exactly as they were."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{out_dir / 'genshop.db'}", out_dir)
    models = load_local_models(preset, index_dir=out_dir / "index")
    records = []
    for brief in demo_briefs():
        record, _ = submit_brief(store, brief, preset)
        callback = progress_for(record) if progress_for else None
        records.append(run_locally(store, record.id, models, callback))
    compared, comparison = base_vs_tuned(store, models, preset, progress_for)
    rows, captions = [], []
    for record in records:
        items = brief_with_items(store, record.id).items
        scores: dict[str, list[str]] = {}
        for score in store.list_scores(record.id):
            scores.setdefault(score.item_id, []).append(f"{score.group_id}:{score.score:+.2f}")
        rows.append((f"{record.title} [{record.status}]", [Image.open(store.images.path(i.image_path)) for i in items]))
        captions.append([" ".join(scores.get(i.id, [f"v{i.variant} seed {i.seed}"])) for i in items])
    for label, row in comparison:
        rows.append((label, [image for image, _ in row]))
        captions.append([caption for _, caption in row])
    records += compared
    legend = (f"GenShop demo on preset {preset}. Under each variant, GROUP:REWARD is the group reward model's score "
              "of that image for each target group of the brief (higher: the group is more likely to choose it; "
              "comparable within a group, not across groups). Unscored variants show their index and seed."
              + (" Base and tuned rows: one design (prompt, seeds) from the base model and from the group's LoRA "
                 f"({', '.join(sorted(models.pipeline.adapters))} loaded from GENSHOP_ADAPTERS)." if comparison else
                 " No group LoRA is loaded (GENSHOP_ADAPTERS), so there are no base vs tuned rows."))
    sheet = save_contact_sheet(rows, out_dir / "contact-sheet.png", captions, legend)
    return records, sheet


def base_vs_tuned(store: Store, models, preset: str, progress_for=None, groups: int = 2, variants: int = 3
                  ) -> tuple[list[BriefRecord], list[tuple[str, list[tuple[Image.Image, str]]]]]:
    """The first demo brief's design from the base model and from the LoRA of each of (up to)
    ``groups`` tuned groups, each image captioned with that group's reward: one brief for the
    base (no target group: the base model) and one per group, the same seeds. Returns the briefs
    run and the rows (label, [(image, caption)]): base, then tuned, for each group."""
    from reward.scoring import score_images

    tuned = sorted(models.pipeline.adapters)[:groups]
    if not tuned or models.scorer is None:
        return [], []
    design = demo_briefs()[0].model_copy(update={"variants": variants, "client_reference": None})
    briefs = {None: design.model_copy(update={"groups": []}),
              **{group: design.model_copy(update={"groups": [group]}) for group in tuned}}
    made = {}
    for group, brief in briefs.items():
        record, _ = submit_brief(store, brief, preset)
        made[group] = run_locally(store, record.id, models, progress_for(record) if progress_for else None)
    base_paths = [store.images.path(i.image_path) for i in store.list_items(made[None].id)]
    base_scores = score_images(models.scorer.model, models.scorer.embedder, base_paths, build_prompt(design), tuned)
    rows = []
    for group in tuned:
        items = store.list_items(made[group].id)
        scores = {s.item_id: s.score for s in store.list_scores(made[group].id) if s.group_id == group}
        rows.append((f"{design.title}: base, group {group}'s reward",
                     [(Image.open(path), f"{group}:{score:+.2f}")
                      for path, score in zip(base_paths, base_scores[group].rewards)]))
        rows.append((f"{design.title}: tuned for group {group} (LoRA)",
                     [(Image.open(store.images.path(i.image_path)), f"{group}:{scores[i.id]:+.2f}") for i in items]))
    return list(made.values()), rows

