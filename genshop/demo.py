"""``genshop demo``: the product tour on the embedded default, no Redis needed.

Runs the demo briefs through the same ``run_brief`` code the Celery workers run (an
in-process worker), prints what was made and writes a contact sheet PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from PIL import Image

from genshop.briefs import parse_brief
from genshop.contact_sheet import save_contact_sheet
from genshop.pipelines import load_pipeline
from genshop.service import Progress, brief_with_items, run_brief, submit_brief
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
    """Generate the demo briefs into ``out_dir`` (its own SQLite store and images)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{out_dir / 'genshop.db'}", out_dir)
    loaded = load_pipeline(preset)
    records = []
    for brief in demo_briefs():
        record, _ = submit_brief(store, brief, preset)
        callback = progress_for(record) if progress_for else None
        records.append(run_brief(store, record.id, loaded, get_settings().max_attempts, callback))
    rows, captions = [], []
    for record in records:
        items = brief_with_items(store, record.id).items
        rows.append((f"{record.title} [{record.status}]", [Image.open(store.images.path(i.image_path)) for i in items]))
        captions.append([f"v{i.variant} seed {i.seed}" for i in items])
    sheet = save_contact_sheet(rows, out_dir / "contact-sheet.png", captions)
    return records, sheet
