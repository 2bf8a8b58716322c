"""``genshop picks export``: designers' picks in the gallery as preference data (source ``manual``).

A designer marks a generated variant as picked or rejected for a customer group (the gallery,
``PUT /api/items/{id}/pick``; table ``picks``). For each brief, group and designer the export
writes impressions in the reward format (``reward.impressions``), the same the A/B import
writes, so ``genshop reward train --impressions`` and ``genshop tune --preferences`` read them
beside A/B imports:

- each picked variant is chosen over every variant of the brief the designer did not pick
  (rejected or unmarked: they were shown together): ``items`` = the pick then those, in
  variant order, ``chosen`` = the pick;
- a brief and group with rejections but no pick is one impression of the rejected variants
  with no choice ("none of these"), when there are at least two.

What cannot become an impression (every variant picked: nothing to prefer it to; a single
rejection and no pick) is counted by reason in the report, never dropped silently. Items are
the images' local files (the image store's path; an S3 store's read cache), timestamps the
time of the designer's last change. Every row passes the import's validation before the file
is written (atomically).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel

from genshop.store import PickRecord, Store
from reward.impressions import COLUMNS, ImpressionValidationError, impressions_frame, validate_impressions, \
    write_impressions


class PicksExportReport(BaseModel):
    out: str
    picks: int
    impressions: int
    not_usable: dict[str, int]


def pick_impressions(store: Store, picks: list[PickRecord]) -> tuple[list[dict], dict[str, int]]:
    """Impression rows (reward format) from picks, and the picks that make none, by reason."""
    by_brief: dict[tuple[str, str, str], list[PickRecord]] = defaultdict(list)
    for pick in picks:
        by_brief[(pick.designer, pick.brief_id, pick.group_id)].append(pick)
    items_of: dict[str, list] = {}
    rows, not_usable = [], defaultdict(int)
    for (designer, brief_id, group), marks in sorted(by_brief.items()):
        if brief_id not in items_of:
            items_of[brief_id] = store.list_items(brief_id)
        shown = items_of[brief_id]
        image = {item.id: str(store.images.path(item.image_path)) for item in shown}
        picked = {m.item_id: m for m in marks if m.choice == "picked"}
        rejected = [m for m in marks if m.choice == "rejected"]
        prompt = shown[0].prompt if shown else ""
        key = f"manual/{designer}/{brief_id}/{group}"
        others = [image[item.id] for item in shown if item.id not in picked]
        for item in shown:
            if item.id not in picked:
                continue
            if not others:
                not_usable["every variant picked"] += 1
                continue
            rows.append({**dict.fromkeys(COLUMNS), "impression_id": f"{key}/{item.id}", "group_id": group,
                         "brief": prompt, "items": [image[item.id], *others], "chosen": image[item.id],
                         "timestamp": picked[item.id].updated_at, "source": "manual"})
        if not picked and len(rejected) >= 2:
            order = {item.id: n for n, item in enumerate(shown)}
            rejected.sort(key=lambda m: order[m.item_id])
            rows.append({**dict.fromkeys(COLUMNS), "impression_id": f"{key}/none", "group_id": group,
                         "brief": prompt, "items": [image[m.item_id] for m in rejected], "chosen": None,
                         "timestamp": max(m.updated_at for m in rejected), "source": "manual"})
        elif not picked and rejected:
            not_usable["a single rejection and no pick"] += 1
    return rows, dict(not_usable)


def export_picks(store: Store, out: str | Path, designer: str | None = None) -> PicksExportReport:
    """Write the picks (of one ``designer``, or everyone's) as an impressions Parquet file."""
    picks = store.list_picks(designer=designer)
    rows, not_usable = pick_impressions(store, picks)
    roots = {str(Path(path).parent) for row in rows for path in row["items"]}
    impressions, issues = validate_impressions(rows, known_items=set(), image_roots=roots or None)
    if issues:  # an image missing from the store, say: nothing is written
        raise ImpressionValidationError(str(out), issues)
    write_impressions(impressions_frame(impressions), out)
    return PicksExportReport(out=str(out), picks=len(picks), impressions=len(impressions), not_usable=not_usable)
