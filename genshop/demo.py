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
    rows, captions = [], []
    for record in records:
        items = brief_with_items(store, record.id).items
        scores: dict[str, list[str]] = {}
        for score in store.list_scores(record.id):
            scores.setdefault(score.item_id, []).append(f"{score.group_id}:{score.score:+.2f}")
        rows.append((f"{record.title} [{record.status}]", [Image.open(store.images.path(i.image_path)) for i in items]))
        captions.append([" ".join(scores.get(i.id, [f"v{i.variant} seed {i.seed}"])) for i in items])
    legend = (f"GenShop demo on preset {preset}. Under each variant, GROUP:REWARD is the group reward model's score "
              "of that image for each target group of the brief (higher: the group is more likely to choose it; "
              "comparable within a group, not across groups). Unscored variants show their index and seed.")
    sheet = save_contact_sheet(rows, out_dir / "contact-sheet.png", captions, legend)
    return records, sheet
