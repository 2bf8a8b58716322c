"""The audit report (``AuditReport``, JSON), its chart (PNG), and the latest audit of each kind on disk.

The latest audit lives beside the store: ``$GENSHOP_HOME/audits/<kind>.json`` and ``<kind>.png``
(``kind``: ``reward`` or ``generator``), each written to a temporary file and renamed, so a
reader (``genshop serve``) sees the previous audit or the new one, never half of one.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from genshop.audit.shares import CONFIDENCE, Disparity, ValueShare

AuditKind = Literal["reward", "generator"]
AUDIT_KINDS: tuple[str, ...] = ("reward", "generator")
AUDIT_ATTRIBUTES = ("colour", "usage", "gender", "article_type")
CHART_VALUES = 8  # values per attribute on the chart: the most common ones and the flagged ones


class GroupAudit(BaseModel):
    group_id: str
    model: str = Field(description="what scored (reward) or made (generator) this group's items")
    items: int = Field(description="top-scored catalog items (reward) or generated images (generator)")
    attributes: dict[str, list[ValueShare]]
    unread: dict[str, int] = Field(default_factory=dict, description="items whose value the understanding did "
                                                                      "not read (abstained), per attribute")


class AuditReport(BaseModel):
    kind: AuditKind
    created: datetime
    model: str = Field(description="the reward model, or the generator preset")
    catalog: list[str] = Field(description="the catalog files the shares are compared with")
    catalog_items: int
    confidence: float = CONFIDENCE
    interval: str = "wilson"
    threshold: float = Field(description="a disparity at least this large (and significant) is flagged")
    settings: dict[str, str | int | float | list[str]] = Field(default_factory=dict)
    groups: list[GroupAudit]
    disparities: list[Disparity] = Field(description="flagged disparities between groups, largest first")
    notes: list[str] = Field(default_factory=list)


def audit_paths(folder: str | Path, kind: str) -> tuple[Path, Path]:
    """(JSON, PNG) of the latest audit of ``kind`` in ``folder``."""
    return Path(folder) / f"{kind}.json", Path(folder) / f"{kind}.png"


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_audit(report: AuditReport, folder: str | Path) -> tuple[Path, Path]:
    """Write the report and its chart as the latest audit of its kind in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = audit_paths(folder, report.kind)
    _replace(png_path, lambda tmp: plot_audit(report, tmp))
    _replace(json_path, lambda tmp: tmp.write_text(report.model_dump_json(indent=1), encoding="utf-8"))
    return json_path, png_path


def load_audit(folder: str | Path, kind: str) -> AuditReport | None:
    json_path, _ = audit_paths(folder, kind)
    if not json_path.is_file():
        return None
    return AuditReport.model_validate_json(json_path.read_text(encoding="utf-8"))


def chart_values(report: AuditReport, attribute: str) -> list[str]:
    """The values drawn for an attribute: those in a flagged disparity, then the catalog's most common."""
    flagged = [d.value for d in report.disparities if d.attribute == attribute]
    shares = report.groups[0].attributes.get(attribute, []) if report.groups else []
    common = [s.value for s in sorted(shares, key=lambda s: -s.catalog_share)]
    return list(dict.fromkeys(flagged + common))[:CHART_VALUES]


def plot_audit(report: AuditReport, path: str | Path) -> Path:
    """One panel per attribute: each group's share of the most telling values (95% intervals) and the catalog's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attributes = [a for a in AUDIT_ATTRIBUTES if report.groups and a in report.groups[0].attributes]
    fig, axes = plt.subplots(len(attributes) or 1, 1, figsize=(10, 2.6 * max(1, len(attributes))), squeeze=False)
    width = 0.8 / max(1, len(report.groups))
    for ax, attribute in zip(axes[:, 0], attributes):
        values = chart_values(report, attribute)
        x = np.arange(len(values))
        for g, group in enumerate(report.groups):
            by_value = {s.value: s for s in group.attributes[attribute]}
            shares = [by_value[v].share if v in by_value else 0.0 for v in values]
            errors = [[s - by_value[v].low if v in by_value else 0.0 for v, s in zip(values, shares)],
                      [by_value[v].high - s if v in by_value else 0.0 for v, s in zip(values, shares)]]
            ax.bar(x - 0.4 + width * (g + 0.5), shares, width, yerr=errors, capsize=2, label=f"group {group.group_id}")
        catalog = {s.value: s.catalog_share for s in report.groups[0].attributes[attribute]}
        ax.scatter(x, [catalog.get(v, 0.0) for v in values], marker="_", s=900, color="black", zorder=3,
                   label="catalog")
        ax.set_xticks(x, values, fontsize=8)
        ax.set_ylabel("share")
        ax.set_title(attribute.replace("_", " "), fontsize=10, loc="left")
    axes[0, 0].legend(fontsize=8, ncol=len(report.groups) + 1, loc="upper right")
    what = "top-scored catalog items" if report.kind == "reward" else "generated images"
    fig.suptitle(f"{report.kind} audit: share of {what} per group against the catalog ({report.model})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72, format="png")
    plt.close(fig)
    return Path(path)
