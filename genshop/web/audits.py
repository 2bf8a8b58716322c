"""The API's bias audits and explanations: the latest ``genshop audit`` of each kind (JSON and chart) and,
for one of the designer's items, which attributes each group's reward rests on (``reward.explanation``).

Audits are read from ``$GENSHOP_HOME/audits`` (``genshop.audit.report``), where ``genshop audit``
writes them; explanations are computed on request with ``GENSHOP_REWARD_MODEL`` and the
understanding of its CLIP (``GENSHOP_UNDERSTANDING``: its heads, else zero-shot), loaded once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from genshop.audit.report import AuditReport, audit_paths, load_audit
from genshop.generation import build_prompt
from genshop.settings import DEFAULT_TAXONOMY, Settings
from genshop.store import Store
from genshop.web.app import RECORD_ID, field_errors, get_app_settings, get_store
from genshop.web.auth import current_designer
from reward.explanation import Explanation

router = APIRouter(prefix="/api", dependencies=[Depends(current_designer)])
Kind = Literal["reward", "generator"]


def _folder(settings: Settings) -> Path:
    return settings.home / "audits"


@router.get("/audits/{kind}", response_model=AuditReport, responses={404: {"description": "no audit of this kind yet"}})
def latest_audit(kind: Kind, settings: Settings = Depends(get_app_settings)) -> AuditReport:
    """The latest ``genshop audit reward`` or ``genshop audit generator``: per group and attribute value, the
    share of top-scored or generated items against the catalog's (95% intervals), and the flagged disparities."""
    report = load_audit(_folder(settings), kind)
    if report is None:
        raise HTTPException(404, f"no {kind} audit yet: run `genshop audit {kind}`")
    return report


@router.get("/audits/{kind}/chart", response_class=Response, responses={200: {"content": {"image/png": {}}}})
def latest_audit_chart(kind: Kind, settings: Settings = Depends(get_app_settings)) -> Response:
    """The latest audit's chart (PNG)."""
    _, png = audit_paths(_folder(settings), kind)
    if not png.is_file():
        raise HTTPException(404, f"no {kind} audit yet: run `genshop audit {kind}`")
    return Response(png.read_bytes(), media_type="image/png")


@lru_cache(maxsize=2)
def _explainer(reward_model: Path, understanding: Path | None, device: str):
    from genshop.understanding.taxonomy import load_taxonomy
    from reward.explanation import load_explainer

    return load_explainer(reward_model, load_taxonomy(DEFAULT_TAXONOMY), understanding, device)


@router.get("/items/{item_id}/explanations", response_model=list[Explanation],
            responses={404: {"description": "no such item of this designer"}, 503: {"description": "scoring is off"}})
def item_explanations(item_id: str, request: Request,
                      group: list[str] = Query(default_factory=list, max_length=16,
                                               description="group ids (default: the brief's target groups)"),
                      designer: str = Depends(current_designer), store: Store = Depends(get_store),
                      settings: Settings = Depends(get_app_settings)) -> list[Explanation]:
    """For each group, which attributes the item's reward rests on: the reward with each attribute the
    understanding reads swapped for the catalog's typical alternatives ("colour Red +0.80")."""
    found = store.get_items([item_id]) if RECORD_ID.fullmatch(item_id) else []
    if not found or store.designer_of(found[0].brief_id) != designer:
        raise HTTPException(404, f"no item with id {item_id[:64]!r}")
    if settings.reward_model is None:
        raise HTTPException(503, "explanations need a reward model (GENSHOP_REWARD_MODEL is 'off')")
    brief = store.get_brief(found[0].brief_id).brief
    groups = list(dict.fromkeys(group)) or brief.groups
    if not groups:
        raise field_errors([("group", "the item's brief targets no group: name one")], "query")
    device = "cpu" if settings.device == "auto" else settings.device
    explainer = _explainer(settings.reward_model, settings.understanding, device)
    [explained] = explainer.explain_images([store.images.path(found[0].image_path)], build_prompt(brief), groups)
    return list(explained.values())
