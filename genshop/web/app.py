"""The designers' HTTP API and web gallery: ``genshop serve``.

One FastAPI app over the same service functions as the CLI, on the same queue and store.
Every ``/api`` route needs a designer's token (``auth``); a designer sees only their own
briefs and generated items: anyone else's answer 404, as if they did not exist. Catalog
products are shared. Bad input is 422 with the offending fields (FastAPI's ``detail``
list, ``loc`` naming the field), a body over its limit 413, a designer at their
queued-brief limit 429, and a queue that cannot be reached 503. Nothing is stored when a
request is refused. A 422 renders whatever was sent, NaN and ±Infinity included (as strings).

The gallery (``/``) is one static page whose script uses this same API. It signs in with
``POST /api/session`` (the token in the body), which answers with the token in an HttpOnly,
SameSite=Strict cookie (Secure on https, or as ``GENSHOP_API_COOKIE_SECURE`` says); ``DELETE
/api/session`` signs out. Every answer carries the headers of ``genshop.web.security``.
``/docs`` and ``/openapi.json`` need a token unless ``GENSHOP_API_PUBLIC_DOCS`` is true.
"""

from __future__ import annotations

import math
import re
import tempfile
import uuid
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, TypeAdapter

from genshop.briefs import MAX_BRIEF_FILE_BYTES, Brief, BriefError
from genshop.experiments.manifest import Arms, ExperimentInputError, Manifest
from genshop.queueing import QueueState, clear, pause, queue_state, resume
from genshop.service import (ItemDetails, ItemScore, cancel_brief, counterparts, details_of, enqueue_brief,
                             item_details, submit_brief)
from genshop.settings import Settings, get_settings
from genshop.store import (THREADS_PER_PROCESS, WAITING_STATUSES, BriefRecord, BriefStatus, ItemQuery,
                           PickChoice, QueueLimitError, Store, UnknownBriefError)
from genshop.understanding.index import IndexInputError, VectorIndex
from genshop.understanding.search import MAX_QUERY_CHARS, QueryError
from genshop.web.auth import TOKEN_COOKIE, current_designer, designer_for_token
from genshop.web.limits import BodySizeLimit
from genshop.web.query_batching import QueryBatcher
from genshop.web.security import SecurityHeaders
from workers.app import check_broker, enqueue_generation, enqueue_new_brief, revoke_task, withdraw_generation_messages

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_SEARCH_K = 100
MAX_LIST_OFFSET = 1_000_000_000  # far past any designer's briefs, far inside the databases' 64-bit OFFSET
MAX_TOKEN_CHARS = 512
RECORD_ID = re.compile(r"[0-9a-f]{32}")  # brief, item and catalog product ids: any other string names nothing


class Counterpart(BaseModel):
    """The same design (prompt, seed, settings) made by another model: base vs a group's LoRA."""

    id: str
    brief_id: str
    model_id: str
    image_url: str
    scores: list[ItemScore]


class PickView(BaseModel):
    group_id: str
    choice: PickChoice


class ItemView(ItemDetails):
    image_url: str
    counterparts: list[Counterpart]
    picks: list[PickView] = Field(description="the designer's marks on this variant, per group")


class FoundItem(ItemDetails):
    image_url: str
    brief_title: str
    brief_status: BriefStatus
    picks: list[PickView]


class ItemPage(BaseModel):
    total: int = Field(description="items matching the filters, all pages")
    items: list[FoundItem]


class PickRequest(BaseModel):
    """A designer's mark on a variant: ``picked``, ``rejected``, or null to withdraw it; for one
    group, or (``group`` null) for each of the brief's target groups."""

    model_config = {"extra": "forbid"}

    choice: PickChoice | None
    group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class QueueScope(BaseModel):
    model_config = {"extra": "forbid"}

    scope: Literal["mine", "all"] = Field(default="mine", description="the designer's own briefs, or the whole "
                                          "queue (designers of GENSHOP_API_QUEUE_ADMINS only)")


class QueueAction(BaseModel):
    brief_ids: list[str] = Field(description="the briefs paused, queued again or cancelled")
    queue: QueueState


class SearchHitView(BaseModel):
    id: str
    kind: str
    score: float
    title: str
    image_url: str
    metadata: dict[str, str]


class ExportRequest(BaseModel):
    """An A/B export of some of the designer's succeeded briefs (``genshop export ab``'s options)."""

    brief_ids: list[str] = Field(min_length=1, max_length=1000)
    arms: Arms
    format: Literal["parquet", "csv", "jsonl"] = "parquet"
    salt: str | None = Field(default=None, max_length=128)


class Designer(BaseModel):
    designer: str
    queued: int
    max_queued: int


class SessionRequest(BaseModel):
    token: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS)


# -- dependencies ---------------------------------------------------------------------------
async def get_store(request: Request) -> Store:  # async: no thread pool hop for an attribute read
    return request.app.state.store


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def owned_brief(brief_id: str, designer: str = Depends(current_designer),
                store: Store = Depends(get_store)) -> BriefRecord:
    if not RECORD_ID.fullmatch(brief_id):  # not looked up (a NUL byte, say, is an error in PostgreSQL)
        raise HTTPException(404, f"no brief with id {brief_id[:64]!r}")
    try:
        return store.get_brief(brief_id, designer)
    except UnknownBriefError:
        raise HTTPException(404, f"no brief with id {brief_id!r}") from None


def image_url(item_id: str) -> str:
    return f"/api/items/{item_id}/image"


def field_errors(issues: list[tuple[str, str]], where: str = "body") -> RequestValidationError:
    """Errors found after FastAPI's own validation, in its 422 format."""
    return RequestValidationError([{"loc": (where, *field.split(".")), "msg": message, "type": "value_error"}
                                   for field, message in issues])


# -- briefs ---------------------------------------------------------------------------------
router = APIRouter(prefix="/api", dependencies=[Depends(current_designer)])


@router.get("/me", response_model=Designer)
def me(designer: str = Depends(current_designer), store: Store = Depends(get_store),
       settings: Settings = Depends(get_app_settings)) -> Designer:
    return Designer(designer=designer, queued=store.count_briefs(WAITING_STATUSES, designer),
                    max_queued=settings.api_max_queued)


@router.post("/briefs", response_model=BriefRecord, status_code=201,
             responses={200: {"description": "a brief with this client_reference exists; it is returned"},
                        409: {"description": "client_reference used by another designer"},
                        413: {"description": f"body over {MAX_BRIEF_FILE_BYTES} bytes"},
                        429: {"description": "the designer's queued-brief limit is reached"},
                        503: {"description": "the queue cannot be reached; nothing was stored"}})
def submit(brief: Brief, response: Response, designer: str = Depends(current_designer),
           store: Store = Depends(get_store), settings: Settings = Depends(get_app_settings)) -> BriefRecord:
    """Validate a brief (the CLI's schema and checks), store it as the designer's, and queue it."""
    try:
        record, created = submit_brief(store, brief, settings.preset, designer, settings.api_max_queued)
    except BriefError as exc:
        raise field_errors([(issue.field, issue.message) for issue in exc.issues]) from None
    except QueueLimitError as exc:
        raise HTTPException(429, str(exc)) from None
    if not created:
        if store.designer_of(record.id) != designer:
            raise HTTPException(409, "client_reference is already used by another brief")
        response.status_code = 200
        return record
    try:
        return enqueue_brief(store, record.id, enqueue_new_brief)
    except Exception as exc:  # noqa: BLE001 - the broker's errors vary; the brief was rolled back
        raise HTTPException(503, f"the queue cannot be reached, nothing was stored: {type(exc).__name__}") from None


@router.get("/briefs", response_model=list[BriefRecord])
def list_briefs(status: BriefStatus | None = None,
                limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_LIST_OFFSET),
                designer: str = Depends(current_designer), store: Store = Depends(get_store)) -> list[BriefRecord]:
    """The designer's briefs, newest first, a page at a time."""
    return store.list_briefs(status, designer, newest_first=True, limit=limit, offset=offset)


@router.get("/briefs/{brief_id}", response_model=BriefRecord)
async def brief_status(record: BriefRecord = Depends(owned_brief)) -> BriefRecord:
    """Status and live progress (``progress``: variants done, denoising step, batch)."""
    # async: the dependency did the reading on the thread pool; this hands it back without a second hop
    return record


@router.post("/briefs/{brief_id}/cancel", response_model=BriefRecord)
def cancel(record: BriefRecord = Depends(owned_brief), store: Store = Depends(get_store)) -> BriefRecord:
    """A queued brief is cancelled at once, a running one at its next denoising step."""
    return cancel_brief(store, record.id, revoke_task)


@router.get("/briefs/{brief_id}/items", response_model=list[ItemView])
def brief_items(record: BriefRecord = Depends(owned_brief), designer: str = Depends(current_designer),
                store: Store = Depends(get_store)) -> list[ItemView]:
    """The generated variants so far, with per-group scores, category and attributes, and the same
    designs from the designer's other briefs made by another model (base vs tuned)."""
    items = item_details(store, record.id)
    siblings = [b.id for b in store.list_briefs(designer=designer, title=record.title) if b.id != record.id]
    others = {i.id: i for brief_id in siblings for i in item_details(store, brief_id)}
    pairs = counterparts(items, list(others.values()))
    picks = picks_by_item(store, designer, [item.id for item in items])
    return [ItemView(**item.model_dump(), image_url=image_url(item.id),
                     counterparts=[Counterpart(id=o.id, brief_id=o.brief_id, model_id=o.model_id,
                                               image_url=image_url(o.id), scores=others[o.id].scores)
                                   for o in pairs[item.id]], picks=picks.get(item.id, []))
            for item in items]


def picks_by_item(store: Store, designer: str, item_ids: list[str]) -> dict[str, list[PickView]]:
    found: dict[str, list[PickView]] = {}
    for pick in store.list_picks(designer=designer, item_ids=item_ids):
        found.setdefault(pick.item_id, []).append(PickView(group_id=pick.group_id, choice=pick.choice))
    return found


@router.get("/items", response_model=ItemPage)
def find_items(query: Annotated[ItemQuery, Query()], designer: str = Depends(current_designer),
               store: Store = Depends(get_store)) -> ItemPage:
    """The designer's generated variants across briefs, filtered (prompt text, seed, model, brief status,
    date, a group's minimum reward) and sorted (newest, oldest, a group's score, seed), a page at a time."""
    if issues := query.issues():
        raise field_errors(issues, "query")
    items, total = store.find_items(designer, query)
    briefs = {b.id: b for b in (store.get_brief(brief_id) for brief_id in {item.brief_id for item in items})}
    picks = picks_by_item(store, designer, [item.id for item in items])
    return ItemPage(total=total, items=[
        FoundItem(**item.model_dump(), image_url=image_url(item.id), brief_title=briefs[item.brief_id].title,
                  brief_status=briefs[item.brief_id].status, picks=picks.get(item.id, []))
        for item in details_of(store, items)])


@router.put("/items/{item_id}/pick", response_model=list[PickView],
            responses={404: {"description": "no such item of this designer"}})
def pick(item_id: str, body: PickRequest, request: Request, designer: str = Depends(current_designer),
         store: Store = Depends(get_store)) -> list[PickView]:
    """Mark a variant picked or rejected (or withdraw the mark) for a group, or for each of the
    brief's target groups; the marks become preference data (``genshop picks export``)."""
    found = store.get_items([item_id]) if RECORD_ID.fullmatch(item_id) else []
    if not found or store.designer_of(found[0].brief_id) != designer:
        raise HTTPException(404, f"no item with id {item_id[:64]!r}")
    targets = store.get_brief(found[0].brief_id).brief.groups
    if body.group and body.group not in targets and body.group not in known_groups(request.app.state.settings):
        raise field_errors([("group", f"{body.group!r} is neither a target group of the brief nor in groups.yaml")])
    groups = [body.group] if body.group else targets
    if not groups:
        raise field_errors([("group", "the brief has no target groups: say which group this choice is for")])
    store.set_picks(item_id, designer, groups, body.choice)
    return picks_by_item(store, designer, [item_id]).get(item_id, [])


@lru_cache(maxsize=2)
def _groups_of(path: Path) -> frozenset[str]:
    from reward.groups import load_groups

    return frozenset(group.id for group in load_groups(path)) if path.is_file() else frozenset()


def known_groups(settings: Settings) -> frozenset[str]:
    """The customer groups of the configs' ``groups.yaml``, besides a brief's own target groups."""
    return _groups_of(settings.configs_dir / "groups.yaml")


# -- the queue ------------------------------------------------------------------------------
def _queue_scope(body: QueueScope, designer: str, settings: Settings) -> str | None:
    """The designer whose briefs an action is for, or None for the whole queue (admins only)."""
    if body.scope == "mine":
        return designer
    if designer not in settings.api_queue_admins:
        raise HTTPException(403, "only the designers of GENSHOP_API_QUEUE_ADMINS may pause or resume the whole queue")
    return None


@router.get("/queue", response_model=QueueState)
def queue(designer: str = Depends(current_designer), store: Store = Depends(get_store)) -> QueueState:
    """Whether the whole queue or the designer's briefs are paused, and their queued and paused briefs."""
    return queue_state(store, designer)


@router.post("/queue/pause", response_model=QueueAction, responses={403: {"description": "scope all: not an admin"}})
def pause_queue(body: QueueScope, designer: str = Depends(current_designer), store: Store = Depends(get_store),
                settings: Settings = Depends(get_app_settings)) -> QueueAction:
    """Hold the designer's queued briefs (or the whole queue's), and any submitted meanwhile; running ones finish."""
    paused = pause(store, _queue_scope(body, designer, settings), withdraw_generation_messages)
    return QueueAction(brief_ids=paused, queue=queue_state(store, designer))


@router.post("/queue/resume", response_model=QueueAction,
             responses={403: {"description": "scope all: not an admin"},
                        503: {"description": "the queue cannot be reached; nothing changed"}})
def resume_queue(body: QueueScope, designer: str = Depends(current_designer), store: Store = Depends(get_store),
                 settings: Settings = Depends(get_app_settings)) -> QueueAction:
    """End the pause: its briefs go back on the queue, each at its place."""
    scope = _queue_scope(body, designer, settings)
    try:
        resumed = resume(store, scope, enqueue_generation, check_broker)
    except Exception as exc:  # noqa: BLE001 - the broker's errors vary; check_broker runs before any change
        raise HTTPException(503, f"the queue cannot be reached: {type(exc).__name__}") from None
    return QueueAction(brief_ids=resumed, queue=queue_state(store, designer))


@router.post("/queue/clear", response_model=QueueAction)
def clear_queue(designer: str = Depends(current_designer), store: Store = Depends(get_store)) -> QueueAction:
    """Cancel all of the designer's queued and paused briefs in one call."""
    cleared = clear(store, designer, withdraw_generation_messages)
    return QueueAction(brief_ids=cleared, queue=queue_state(store, designer))


@router.get("/items/{item_id}/image", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such item of this designer"}})
def item_image(item_id: str, designer: str = Depends(current_designer), store: Store = Depends(get_store)):
    """The image of one of the designer's generated items, or of a catalog product."""
    relative = None
    if not RECORD_ID.fullmatch(item_id):
        raise HTTPException(404, f"no item with id {item_id[:64]!r}")
    if generated := store.get_items([item_id]):
        if store.designer_of(generated[0].brief_id) == designer:
            relative = generated[0].image_path
    elif product := store.get_catalog_products([item_id]):
        relative = product[0].image_path
    if relative is None:
        raise HTTPException(404, f"no item with id {item_id!r}")
    return Response(store.images.read(relative), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=31536000, immutable"})


# -- search ---------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _index_version(folder: str, saved_ns: int) -> VectorIndex:
    return VectorIndex.load(folder)


@lru_cache(maxsize=2)
def _remote_index(url: str):
    from genshop.understanding.remote import RemoteIndex

    return RemoteIndex(url, "main")


def current_index(folder: Path, url: str | None = None):
    """The index owner's index (``GENSHOP_INDEX_URL``), or the folder's last saved index, loaded
    once per save (saves commit by renaming the manifest); None when there is none yet."""
    if url:
        remote = _remote_index(url)
        return remote if remote.exists() else None
    manifest = folder / "manifest.json"
    try:
        return _index_version(str(folder), manifest.stat().st_mtime_ns)
    except FileNotFoundError:
        return None


@lru_cache(maxsize=2)
def _embedder(model_dir: Path, device: str):
    from genshop.embedding import EmbeddingConfig, load_embedder

    return load_embedder(EmbeddingConfig.for_directory(model_dir, device=device))


def _search(request: Request, designer: str, text: str | None, image: Path | None, k: int) -> list[SearchHitView]:
    from genshop.understanding.search import search

    settings: Settings = request.app.state.settings
    if settings.embedding_model is None:
        raise HTTPException(503, "search is off (GENSHOP_EMBEDDING_MODEL is 'off')")
    index = current_index(settings.index_dir, settings.index_url)
    if index is None:
        return []
    try:
        hits = search(index, _embedder(settings.embedding_model, settings.device), text, image,
                      k=min(len(index), overfetch(k)))
    except (QueryError, IndexInputError) as exc:
        field = {"query": "q"}.get(exc.field, exc.field)
        message = str(exc).partition(": ")[2].replace(str(image), "the upload")
        raise field_errors([(field, message)], "query" if image is None else "body") from None
    return visible_hits(request.app.state.store, {designer: hits}, k)[designer]


def overfetch(k: int) -> int:
    return 4 * k + 16  # room for other designers' items, dropped by visible_hits


def visible_hits(store: Store, hits_of: dict, k: int) -> dict:
    """Each asker's hits (asker → hits) less other designers' generated items, the top ``k`` as views.
    An asker is a designer, or (designer, anything) for several queries of one batch."""
    maybe_generated = list({h.id for hits in hits_of.values() for h in hits if h.metadata.get("kind") != "catalog"})
    generated = {item.id: item.brief_id for item in store.get_items(maybe_generated)} if maybe_generated else {}
    owners = {brief_id: store.designer_of(brief_id) for brief_id in set(generated.values())}
    views = {}
    for asker, hits in hits_of.items():
        designer = asker[0] if isinstance(asker, tuple) else asker
        visible = [h for h in hits if h.id not in generated or owners[generated[h.id]] == designer][:k]
        views[asker] = [SearchHitView(id=h.id, kind=h.metadata.get("kind", ""), score=h.score,
                                      title=h.metadata.get("title", ""), image_url=image_url(h.id),
                                      metadata={key: v for key, v in h.metadata.items() if key != "image_path"})
                        for h in visible]
    return views


SEARCH_HITS = TypeAdapter(list[SearchHitView])


def answer_text_searches(app: FastAPI, queries: list[tuple[str, str, int]]) -> list[bytes]:
    """Concurrent text searches (designer, checked text, k) answered together, on a worker thread:
    their vectors from the cache or one CLIP forward, one index search, one ownership read; each
    answer's JSON made here too, so the event loop only sends it."""
    from genshop.understanding.search import TextVectorCache, search_texts

    settings: Settings = app.state.settings
    index = current_index(settings.index_dir, settings.index_url)
    if index is None:
        return [b"[]" for _ in queries]
    embedder = _embedder(settings.embedding_model, settings.device)
    if getattr(app.state, "text_vectors", None) is None or app.state.text_vectors.embedder is not embedder:
        app.state.text_vectors = TextVectorCache(embedder)
    k = max(k for _, _, k in queries)
    hits = search_texts(index, app.state.text_vectors, [text for _, text, _ in queries], min(len(index), overfetch(k)))
    views = visible_hits(app.state.store, {(designer, n): row for n, ((designer, _, _), row)
                                           in enumerate(zip(queries, hits))}, k)
    return [SEARCH_HITS.dump_json(views[(designer, n)][:k_n]) for n, (designer, _, k_n) in enumerate(queries)]


@router.get("/search", response_model=list[SearchHitView])
async def search_text(request: Request, q: str = Query(min_length=1, max_length=MAX_QUERY_CHARS),
                      k: int = Query(10, ge=1, le=MAX_SEARCH_K), designer: str = Depends(current_designer)):
    """Text → image search over the catalog and the designer's generated items. Concurrent
    searches are answered together on a worker thread (``QueryBatcher``): the event loop does no model work."""
    from genshop.understanding.search import checked_text

    if request.app.state.settings.embedding_model is None:
        raise HTTPException(503, "search is off (GENSHOP_EMBEDDING_MODEL is 'off')")
    try:
        text = checked_text(q)
    except QueryError as exc:
        raise field_errors([("q", str(exc).partition(": ")[2])], "query") from None
    return Response(await request.app.state.text_search.ask((designer, text, k)), media_type="application/json")


@router.post("/search", response_model=list[SearchHitView])
def search_image(request: Request, image: UploadFile = File(description="query image (PNG, JPEG, ...)"),
                 q: str | None = Form(None, max_length=MAX_QUERY_CHARS), k: int = Form(10, ge=1, le=MAX_SEARCH_K),
                 designer: str = Depends(current_designer)):
    """Image → image search (with ``q``, the image and the text combined)."""
    # the client's filename is used for nothing (an over-long or NUL-bearing one cannot fail here):
    # Pillow recognizes the format by its bytes
    with tempfile.NamedTemporaryFile(suffix=".upload") as upload:
        upload.write(image.file.read())
        upload.flush()
        return _search(request, designer, q, Path(upload.name), k)


# -- exports --------------------------------------------------------------------------------
@router.post("/exports", response_model=Manifest, status_code=201)
def export(request_body: ExportRequest, designer: str = Depends(current_designer),
           store: Store = Depends(get_store), settings: Settings = Depends(get_app_settings)) -> Manifest:
    """Export the designer's listings for an A/B test (``genshop export ab``); the folder is on the server."""
    from genshop.experiments.export import ExportConfig, export_ab

    for brief_id in request_body.brief_ids:
        if not RECORD_ID.fullmatch(brief_id) or store.designer_of(brief_id) != designer:
            raise HTTPException(404, f"no brief with id {brief_id[:64]!r}")
    experiment_id = f"exp-{uuid.uuid4().hex[:12]}"
    config = ExportConfig(out=settings.home / "exports" / experiment_id, arms=request_body.arms,
                          briefs=request_body.brief_ids, experiment_id=experiment_id, salt=request_body.salt,
                          format=request_body.format)
    try:
        return export_ab(store, config)
    except ExperimentInputError as exc:
        field = "arms" if exc.source == "--arms" else "brief_ids"
        raise field_errors([(field, issue) for issue in exc.issues]) from None


# -- the gallery's session ----------------------------------------------------------------------
sessions = APIRouter(prefix="/api")


def _secure_cookie(request: Request, settings: Settings) -> bool:
    return settings.api_cookie_secure if settings.api_cookie_secure is not None else request.url.scheme == "https"


@sessions.post("/session", response_model=Designer, responses={401: {"description": "the token is not valid"}})
def sign_in(body: SessionRequest, request: Request, response: Response, store: Store = Depends(get_store),
            settings: Settings = Depends(get_app_settings)) -> Designer:
    """Sign in the gallery: the server keeps the token in an HttpOnly, SameSite=Strict cookie
    (Secure on https), which the page's script cannot read."""
    designer = designer_for_token(request.app.state.tokens, body.token)
    if designer is None:
        raise HTTPException(401, "the token is not valid", headers={"WWW-Authenticate": "Bearer"})
    response.set_cookie(TOKEN_COOKIE, body.token, path="/", httponly=True, samesite="strict",
                        secure=_secure_cookie(request, settings))
    return Designer(designer=designer, queued=store.count_briefs(WAITING_STATUSES, designer),
                    max_queued=settings.api_max_queued)


@sessions.delete("/session", status_code=204)
async def sign_out(request: Request, response: Response, settings: Settings = Depends(get_app_settings)) -> None:
    """Sign out: the cookie is cleared."""
    response.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=_secure_cookie(request, settings))


def _json_safe(value):
    """Non-finite floats (which JSON has no literal for) as strings, in any nesting."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, which cannot fail: the input it echoes may hold NaN or ±Infinity."""
    return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})


# -- the app --------------------------------------------------------------------------------
@asynccontextmanager
async def lifespan(_app: FastAPI):
    # sync routes run on anyio's thread pool (40 threads by default); more threads than the store's
    # connections only add switching, so both are sized alike
    to_thread.current_default_thread_limiter().total_tokens = THREADS_PER_PROCESS
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(lifespan=lifespan, title="GenShop", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Designers' API: briefs on the generation queue, their variants with per-group reward "
                              "scores and attributes, search, A/B exports.")
    app.state.settings = settings
    app.state.store = Store(settings.database_url, settings.home, settings.images_url)
    app.state.tokens = {designer: token.get_secret_value() for designer, token in settings.api_tokens.items()}
    app.state.text_search = QueryBatcher(lambda queries: answer_text_searches(app, queries))
    app.include_router(router)
    from genshop.web.audits import router as audits  # it imports this module's dependencies

    app.include_router(audits)
    app.include_router(sessions)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodySizeLimit, default=settings.api_max_upload_bytes,
                       limits={"/api/briefs": MAX_BRIEF_FILE_BYTES, "/api/exports": MAX_BRIEF_FILE_BYTES,
                               "/api/session": 4 * MAX_TOKEN_CHARS})
    app.add_middleware(SecurityHeaders)  # outermost: the 413s of BodySizeLimit carry the headers too
    docs = [] if settings.api_public_docs else [Depends(current_designer)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="GenShop API")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def gallery() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app
