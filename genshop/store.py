"""The store: SQLAlchemy tables and the content-addressed image files.

This module is the only code that writes the database. Everything it hands out is a
pydantic record, never an ORM row. Two databases are supported and tested: SQLite (the
default under ``GENSHOP_HOME``, in WAL mode so several worker processes can write) and
PostgreSQL (``postgresql+psycopg://...``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint, case, create_engine, delete, event, func, literal, select, update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from genshop.briefs import Brief
from genshop.images import LocalImageStore, open_image_store

ImageStore = LocalImageStore  # the local folder store, by its former name

BriefStatus = Literal["queued", "paused", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
WAITING_STATUSES = ("queued", "paused")  # not started yet: what a designer's queued-brief limit counts
PickChoice = Literal["picked", "rejected"]
THREADS_PER_PROCESS = 8  # the most threads one process (the API server's pool) uses the store from at once
MAX_COUNT = 10**15  # funnel counts: far above any shop's, far below BIGINT's 2**63 (sums of many rows stay in int64)
QUEUE_LOCK_KEY = 1_701_000_017  # PostgreSQL advisory lock namespace of the per-designer queued-brief count
PAUSE_LOCK_KEY = 1_701_000_023  # PostgreSQL advisory lock of queue pauses: pause/resume exclusive, submit/start shared
ALL_SCOPE = "all"  # the queue_pauses scope of the whole queue; a designer's is "designer:<name>"
QUEUE_RANKS = 5  # places counted in a designer's queue (genshop.queueing): the 5th queued and later share one
ITEM_NAMESPACE = uuid.UUID("5f0c2a1e-6d3b-4c8e-9a7f-2b1d0e4c6a90")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class BriefRow(Base):
    __tablename__ = "briefs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_reference: Mapped[str | None] = mapped_column(String(128), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)
    preset: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    task_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # who submitted it through the HTTP API (None: from the CLI); migration 0003 moved it here
    # from a table of its own (brief_designers)
    designer: Mapped[str | None] = mapped_column(String(64), index=True)
    # the brief's `priority` (also in spec), a column so a designer's place in the queue is one count (0004)
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")


class QueuePauseRow(Base):
    """A pause of the generation queue: the whole queue (scope ``all``) or one designer's briefs
    (``designer:<name>``). While one covers a brief it is not started (status ``paused``); migration 0004."""

    __tablename__ = "queue_pauses"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PickRow(Base):
    """A designer's choice on a generated variant for one customer group: picked or rejected
    (the gallery's marks; ``genshop picks export`` makes them impressions, source ``manual``; 0004)."""

    __tablename__ = "picks"
    __table_args__ = (UniqueConstraint("item_id", "group_id", "designer", name="uq_pick_item_group_designer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    brief_id: Mapped[str] = mapped_column(ForeignKey("briefs.id", ondelete="CASCADE"), index=True)
    designer: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[str] = mapped_column(String(64))
    choice: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BriefRunRow(Base):
    """Who runs a brief now: the lease of one delivery, renewed by its heartbeat.

    A delivery runs a brief only while it holds the lease (``owner`` set, ``heartbeat_at``
    fresher than the lease timeout), so two deliveries of one brief never run it at once.
    ``followups_at`` records that the score and enrich tasks were queued for the finished
    brief, so a redelivered message of a finished brief queues nothing again (migration 0002)."""

    __tablename__ = "brief_runs"

    brief_id: Mapped[str] = mapped_column(ForeignKey("briefs.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    followups_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ItemRow(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("brief_id", "variant", name="uq_item_brief_variant"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    brief_id: Mapped[str] = mapped_column(ForeignKey("briefs.id", ondelete="CASCADE"), index=True)
    variant: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(256))
    model_revision: Mapped[str] = mapped_column(String(128))
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_path: Mapped[str] = mapped_column(String(256))
    timings: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ScoreRow(Base):
    """A reward model's score of one item for one customer group."""

    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("item_id", "group_id", "reward_model", name="uq_score_item_group_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    group_id: Mapped[str] = mapped_column(String(64))
    reward_model: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    population_fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CatalogProductRow(Base):
    """A real product of the shop's catalog (``genshop catalog import``), beside the generated items."""

    __tablename__ = "catalog_products"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    product_id: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(Text)
    attributes: Mapped[dict] = mapped_column(JSON)  # taxonomy columns: master_category, colour, ...
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_path: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UnderstandingRow(Base):
    """What the enrich stage made of one item (generated or catalog) with one embedding model."""

    __tablename__ = "understandings"
    __table_args__ = (UniqueConstraint("item_id", "embedding_model", name="uq_understanding_item_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    embedding_model: Mapped[str] = mapped_column(String(128))
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    categories: Mapped[dict] = mapped_column(JSON)
    attributes: Mapped[dict] = mapped_column(JSON)
    title: Mapped[str] = mapped_column(Text)
    near_duplicate_of: Mapped[str | None] = mapped_column(String(32))
    near_duplicate_similarity: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExperimentRow(Base):
    """An A/B export (``genshop export ab``): its manifest and where its files are."""

    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    manifest: Mapped[dict] = mapped_column(JSON)
    export_dir: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AbResultRow(Base):
    """One listing's funnel counts for one customer group in an experiment (``genshop import ab-results``)."""

    __tablename__ = "ab_results"
    __table_args__ = (UniqueConstraint("experiment_id", "listing_id", "group_id", name="uq_ab_result"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    listing_id: Mapped[str] = mapped_column(String(64))
    arm: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[str] = mapped_column(String(64))
    impressions: Mapped[int] = mapped_column(BigInteger)
    clicks: Mapped[int] = mapped_column(BigInteger)
    add_to_carts: Mapped[int] = mapped_column(BigInteger)
    purchases: Mapped[int] = mapped_column(BigInteger)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BriefRecord(BaseModel):
    id: str
    client_reference: str | None
    title: str
    brief: Brief
    preset: str
    status: BriefStatus
    error: str | None
    progress: dict[str, Any]
    task_id: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    enqueued_at: datetime | None
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    designer: str | None = Field(default=None, description="who submitted it through the API; None: the CLI")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class NewItem(BaseModel):
    brief_id: str
    variant: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    model_id: str
    model_revision: str
    image_sha256: str
    image_path: str
    timings: dict[str, float]


class ItemRecord(NewItem):
    id: str
    created_at: datetime


class NewScore(BaseModel):
    item_id: str
    group_id: str
    reward_model: str
    score: float
    population_fallback: bool = False


class ScoreRecord(NewScore):
    created_at: datetime


class NewCatalogProduct(BaseModel):
    product_id: str
    title: str
    attributes: dict[str, str]
    image_sha256: str
    image_path: str


class CatalogProductRecord(NewCatalogProduct):
    id: str
    created_at: datetime


ItemKind = Literal["generated", "catalog"]


class NewUnderstanding(BaseModel):
    item_id: str
    kind: ItemKind
    embedding_model: str
    embedding: bytes = Field(description="float32 little-endian, unit length")
    categories: dict[str, Any] = Field(description="level → {label, confidence, abstained}")
    attributes: dict[str, Any] = Field(description="family → {label, confidence, abstained}")
    title: str
    near_duplicate_of: str | None = None
    near_duplicate_similarity: float | None = None


class UnderstandingRecord(NewUnderstanding):
    created_at: datetime


class PickRecord(BaseModel):
    item_id: str
    brief_id: str
    designer: str
    group_id: str
    choice: PickChoice
    created_at: datetime
    updated_at: datetime


ItemSort = Literal["newest", "oldest", "score", "seed"]


class ItemQuery(BaseModel):
    """Which of a designer's generated items to list, and in what order (``Store.find_items``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str | None = Field(default=None, min_length=1, max_length=200, description="in the prompt, any case")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    model: str | None = Field(default=None, pattern=r"^(base|lora:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$",
                              description="'base', or 'lora:G' for group G's LoRA")
    status: BriefStatus | None = Field(default=None, description="the brief's status")
    group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                              description="the group whose reward min_score and sort=score use")
    min_score: float | None = Field(default=None, ge=-1e6, le=1e6)
    since: datetime | None = None
    until: datetime | None = None
    sort: ItemSort = "newest"
    limit: int = Field(default=24, ge=1, le=200)
    offset: int = Field(default=0, ge=0, le=10**9)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """A date or a time without an offset is UTC (the store's times are)."""
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    def issues(self) -> list[tuple[str, str]]:
        """What the fields allow one by one but not together: (field, message)."""
        if self.group is None and (self.min_score is not None or self.sort == "score"):
            return [("group", "min_score and sort=score need the group whose reward they use")]
        if self.since and self.until and self.since > self.until:
            return [("until", "is before since")]
        return []


class ExperimentRecord(BaseModel):
    id: str
    manifest: dict[str, Any] = Field(description="the export's manifest.json, as written")
    export_dir: str
    created_at: datetime


class AbResult(BaseModel):
    """Funnel counts of one listing for one group; the import validates them against the manifest."""

    experiment_id: str
    listing_id: str
    arm: str
    group_id: str
    impressions: int = Field(ge=0, le=MAX_COUNT)
    clicks: int = Field(ge=0, le=MAX_COUNT)
    add_to_carts: int = Field(ge=0, le=MAX_COUNT)
    purchases: int = Field(ge=0, le=MAX_COUNT)


def catalog_product_id(product_id: str) -> str:
    """Deterministic id of a catalog product: importing the same catalog twice adds nothing."""
    return uuid.uuid5(ITEM_NAMESPACE, f"catalog/{product_id}").hex


def item_id(brief_id: str, variant: int) -> str:
    """Deterministic item id: the same brief and variant always name the same item."""
    return uuid.uuid5(ITEM_NAMESPACE, f"{brief_id}/{variant}").hex


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _pause_covers(designer):
    """Whether a pause covers a brief of ``designer`` (a column or a literal): the whole queue's or theirs."""
    return select(QueuePauseRow.scope).where(
        (QueuePauseRow.scope == ALL_SCOPE) | (QueuePauseRow.scope == literal("designer:").concat(designer))).exists()


def _start_row(row: BriefRow, max_attempts: int, pauses: set[str]) -> BriefRecord:
    """``start_attempt`` on a brief row read for update, the pauses in force (``QueuePauseRow.scope``) read
    in the same transaction: running, or as it is (finished, paused), paused, cancelled or failed."""
    if row.status in TERMINAL_STATUSES or row.status == "paused":
        return _to_record(row)
    if row.status == "queued" and not row.cancel_requested and (
            ALL_SCOPE in pauses or (row.designer is not None and f"designer:{row.designer}" in pauses)):
        row.status = "paused"  # a message the pause could not withdraw: resuming sends a new one
        return _to_record(row)
    if row.cancel_requested:
        row.status, row.finished_at = "cancelled", utcnow()
        return _to_record(row)
    row.attempts += 1
    if row.attempts > max_attempts:
        row.status, row.finished_at = "failed", utcnow()
        row.error = f"abandoned after {max_attempts} deliveries whose workers died"
    else:
        row.status, row.error = "running", None
        row.started_at = row.started_at or utcnow()
    return _to_record(row)


def _to_record(row: BriefRow) -> BriefRecord:
    return BriefRecord(
        id=row.id, client_reference=row.client_reference, title=row.title, brief=Brief.model_validate(row.spec),
        preset=row.preset, status=row.status, error=row.error, progress=row.progress or {}, task_id=row.task_id,
        attempts=row.attempts, cancel_requested=row.cancel_requested, created_at=row.created_at,
        enqueued_at=row.enqueued_at, updated_at=row.updated_at, started_at=row.started_at,
        finished_at=row.finished_at, designer=row.designer,
    )


class UnknownBriefError(LookupError):
    pass


class QueueLimitError(RuntimeError):
    """A designer already has as many queued briefs as they may."""


class UnknownExperimentError(LookupError):
    pass


class Store:
    def __init__(self, database_url: str, home: str | Path, images_url: str | None = None,
                 auto_upgrade: bool | None = None):
        """Open the database, its schema brought to this code's revision (``genshop.db.ensure_schema``:
        ``auto_upgrade`` None follows ``GENSHOP_DB_AUTO_UPGRADE``), and the image store ``images_url`` names."""
        from genshop.db import ensure_schema

        self.url = database_url
        if database_url.startswith("sqlite:///"):
            Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if database_url.startswith("sqlite"):  # a local file: nothing to ping; enough connections for a server's threads
            self.engine = create_engine(database_url, pool_size=THREADS_PER_PROCESS, max_overflow=THREADS_PER_PROCESS)
        else:
            self.engine = create_engine(database_url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        ensure_schema(self.engine, auto_upgrade)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.images = open_image_store(images_url, home)

    # -- briefs -----------------------------------------------------------------------
    def create_brief(self, brief: Brief, preset: str, designer: str | None = None,
                     max_queued: int | None = None) -> tuple[BriefRecord, bool]:
        """Store a resolved brief as queued. Returns (record, created); a known
        ``client_reference`` returns the first brief and ``created=False`` (the unique
        constraint decides, so concurrent submissions of one reference make one brief).

        With a ``designer``, the brief is recorded as theirs, and with ``max_queued`` it is
        refused (``QueueLimitError``) if they already have that many briefs queued. The count
        and the insert hold a per-designer lock, so concurrent submissions never pass the
        limit: SQLite's ``BEGIN IMMEDIATE`` (the database's write lock, across processes),
        PostgreSQL's ``pg_advisory_xact_lock`` on the designer (other designers do not wait)."""
        row = BriefRow(
            id=uuid.uuid4().hex, client_reference=brief.client_reference, title=brief.title,
            spec=brief.model_dump(mode="json"), preset=preset, status="queued", progress={}, attempts=0,
            cancel_requested=False, created_at=utcnow(), updated_at=utcnow(), designer=designer,
            priority=brief.priority,
        )
        try:
            with self.sessions.begin() as session:
                self._lock_pauses(session, exclusive=False)
                if designer is not None and max_queued is not None:
                    self._lock_designer_queue(session, designer)
                    queued = session.scalar(self._briefs_where(select(func.count()).select_from(BriefRow),
                                                               WAITING_STATUSES, designer)) or 0
                    if queued >= max_queued:
                        raise QueueLimitError(f"designer {designer!r} already has {queued} queued briefs "
                                              f"(the limit is {max_queued}); wait for some to start")
                if session.scalar(select(_pause_covers(literal(designer, String)))):
                    row.status = "paused"  # queued when the pause ends (genshop.queueing.resume)
                session.add(row)
        except IntegrityError:
            existing = self.find_by_reference(brief.client_reference) if brief.client_reference else None
            if existing is None:
                raise
            return existing, False
        return _to_record(row), True

    def _lock_designer_queue(self, session, designer: str) -> None:
        """PostgreSQL's ``pg_advisory_xact_lock`` on the designer, held until the transaction ends
        (on SQLite ``_lock_pauses`` already holds the database's write lock)."""
        if self.engine.dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(QUEUE_LOCK_KEY, func.hashtext(designer))))

    def _lock_pauses(self, session, exclusive: bool) -> None:
        """The first statement of ``session``'s transaction, held until it ends: pausing and resuming
        (``exclusive``) exclude submitting and starting briefs, which do not exclude each other.
        SQLite: ``BEGIN IMMEDIATE``, the database's write lock (pysqlite would begin lazily, before
        the first write, leaving the reads outside the transaction; busy_timeout waits for it).
        PostgreSQL: an advisory transaction lock, shared or exclusive."""
        if self.engine.dialect.name == "sqlite":
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        elif self.engine.dialect.name == "postgresql":
            lock = func.pg_advisory_xact_lock if exclusive else func.pg_advisory_xact_lock_shared
            session.execute(select(lock(PAUSE_LOCK_KEY)))

    # -- queue control: priority places, pauses, clearing ----------------------------------
    def queue_place(self, record: BriefRecord) -> int:
        """How many of the brief's designer's queued briefs of its priority were submitted before it
        (counted up to ``QUEUE_RANKS - 1``): its place in that designer's line."""
        ahead = (select(BriefRow.id).where(
            BriefRow.status == "queued", BriefRow.priority == record.brief.priority, BriefRow.id != record.id,
            BriefRow.created_at <= record.created_at,
            BriefRow.designer.is_(None) if record.designer is None else BriefRow.designer == record.designer)
            .limit(QUEUE_RANKS - 1).subquery())
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(ahead)) or 0

    def pause_queue(self, designer: str | None) -> list[BriefRecord]:
        """Pause the whole queue (``designer`` None) or one designer's briefs: every queued brief it
        covers becomes ``paused`` (and any submitted while it lasts). Returns those briefs; their
        queue messages are for the caller to withdraw (a worker given one starts nothing)."""
        scope = ALL_SCOPE if designer is None else f"designer:{designer}"
        with self.sessions.begin() as session:
            self._lock_pauses(session, exclusive=True)
            if session.get(QueuePauseRow, scope) is None:
                session.add(QueuePauseRow(scope=scope, paused_at=utcnow()))
                session.flush()
            rows = list(session.scalars(select(BriefRow).where(BriefRow.status == "queued",
                                                              _pause_covers(BriefRow.designer))
                                        .order_by(BriefRow.created_at).with_for_update()))
            for row in rows:
                row.status = "paused"
            return [_to_record(row) for row in rows]

    def resume_queue(self, designer: str | None) -> list[BriefRecord]:
        """End a pause: the paused briefs no other pause covers are queued again (re-stamped as
        enqueued now), oldest first; the caller puts them on the queue."""
        scope = ALL_SCOPE if designer is None else f"designer:{designer}"
        with self.sessions.begin() as session:
            self._lock_pauses(session, exclusive=True)
            session.execute(delete(QueuePauseRow).where(QueuePauseRow.scope == scope))
            rows = list(session.scalars(select(BriefRow).where(BriefRow.status == "paused",
                                                              ~_pause_covers(BriefRow.designer))
                                        .order_by(BriefRow.created_at).with_for_update()))
            now = utcnow()
            for row in rows:
                row.status, row.enqueued_at = "queued", now
            return [_to_record(row) for row in rows]

    def queue_pauses(self) -> list[str]:
        """The pauses in force: ``all`` and/or ``designer:<name>``."""
        with self.sessions() as session:
            return list(session.scalars(select(QueuePauseRow.scope).order_by(QueuePauseRow.scope)))

    def clear_queue(self, designer: str | None) -> list[BriefRecord]:
        """Cancel every queued or paused brief of ``designer`` (None: the CLI's) in one transaction."""
        with self.sessions.begin() as session:
            self._lock_pauses(session, exclusive=True)
            rows = list(session.scalars(select(BriefRow).where(
                BriefRow.status.in_(WAITING_STATUSES),
                BriefRow.designer.is_(None) if designer is None else BriefRow.designer == designer)
                .order_by(BriefRow.created_at).with_for_update()))
            now = utcnow()
            for row in rows:
                row.status, row.cancel_requested, row.finished_at = "cancelled", True, now
            return [_to_record(row) for row in rows]

    def designer_of(self, brief_id: str) -> str | None:
        with self.sessions() as session:
            return session.scalar(select(BriefRow.designer).where(BriefRow.id == brief_id))

    def find_by_reference(self, reference: str) -> BriefRecord | None:
        with self.sessions() as session:
            row = session.scalars(select(BriefRow).where(BriefRow.client_reference == reference)).first()
            return _to_record(row) if row else None

    def get_brief(self, brief_id: str, designer: str | None = None) -> BriefRecord:
        """The brief; with a ``designer``, only if it is theirs (anyone else's is unknown to them)."""
        with self.sessions() as session:
            if designer is None:
                row = session.get(BriefRow, brief_id)
            else:
                row = session.scalar(select(BriefRow).where(BriefRow.id == brief_id, BriefRow.designer == designer))
            if row is None:
                raise UnknownBriefError(f"no brief with id {brief_id!r}")
            return _to_record(row)

    def get_briefs(self, brief_ids: list[str]) -> dict[str, BriefRecord]:
        """The known briefs among ``brief_ids``, by id (one query)."""
        with self.sessions() as session:
            rows = session.scalars(select(BriefRow).where(BriefRow.id.in_(brief_ids)))
            return {row.id: _to_record(row) for row in rows}

    def list_briefs(self, status: str | None = None, designer: str | None = None, title: str | None = None,
                    newest_first: bool = False, limit: int | None = None, offset: int = 0) -> list[BriefRecord]:
        with self.sessions() as session:
            query = self._briefs_where(select(BriefRow), status, designer, title)
            query = query.order_by(BriefRow.created_at.desc() if newest_first else BriefRow.created_at)
            return [_to_record(r) for r in session.scalars(query.offset(offset).limit(limit))]

    def count_briefs(self, status: str | tuple[str, ...] | None = None, designer: str | None = None) -> int:
        with self.sessions() as session:
            return session.scalar(self._briefs_where(select(func.count()).select_from(BriefRow), status, designer)) or 0

    @staticmethod
    def _briefs_where(query, status: str | tuple[str, ...] | None, designer: str | None, title: str | None = None):
        if isinstance(status, tuple):
            query = query.where(BriefRow.status.in_(status))
        elif status:
            query = query.where(BriefRow.status == status)
        if title is not None:
            query = query.where(BriefRow.title == title)
        if designer is not None:
            query = query.where(BriefRow.designer == designer)
        return query

    def delete_queued_brief(self, brief_id: str) -> None:
        """Roll back a brief that could not be enqueued (it never ran, it has no items)."""
        with self.sessions.begin() as session:
            row = session.get(BriefRow, brief_id)
            if row is not None and row.status == "queued" and row.attempts == 0:
                session.delete(row)

    def mark_enqueued(self, brief_id: str, task_id: str) -> None:
        self._update(brief_id, task_id=task_id, enqueued_at=utcnow())

    def stale_briefs(self, older_than: datetime, lease_older_than: datetime | None = None) -> list[str]:
        """Unfinished briefs nobody has touched or enqueued since ``older_than`` and whose
        lease (if any) has lapsed or was released: no live delivery runs them."""
        lease_older_than = lease_older_than or older_than
        live_lease = select(BriefRunRow.brief_id).where(
            BriefRunRow.brief_id == BriefRow.id, BriefRunRow.owner.is_not(None),
            BriefRunRow.heartbeat_at >= lease_older_than).exists()
        with self.sessions() as session:
            return list(session.scalars(select(BriefRow.id).where(
                BriefRow.status.in_(("queued", "running")), BriefRow.cancel_requested.is_(False),
                BriefRow.updated_at < older_than, BriefRow.enqueued_at < older_than, ~live_lease)))

    def claim_stale(self, older_than: datetime, brief_ids: list[str] | None = None) -> list[BriefRecord]:
        """Unfinished briefs nobody has touched since ``older_than`` (their queue message
        was lost, or their worker died and its message with it), re-stamped as enqueued
        now; only those of ``brief_ids`` when given (``stale_briefs`` less the ones whose
        message the broker still holds). The stamp is a compare-and-set, so of several
        sweepers only one claims each."""
        claimed = []
        candidates = self.stale_briefs(older_than) if brief_ids is None else brief_ids
        for brief_id in candidates:
            with self.sessions.begin() as session:
                result = session.execute(update(BriefRow).where(
                    BriefRow.id == brief_id, BriefRow.updated_at < older_than, BriefRow.enqueued_at < older_than,
                    BriefRow.status.in_(("queued", "running"))).values(enqueued_at=utcnow()))
                if result.rowcount == 1:
                    claimed.append(_to_record(session.get(BriefRow, brief_id)))
        return claimed

    def start_attempt(self, brief_id: str, max_attempts: int) -> BriefRecord:
        """Mark a delivery of the brief as running. A brief already finished, cancelled or
        paused is returned unchanged (a queued one a pause covers becomes paused); one delivered more than ``max_attempts``
        times (its workers died) is failed."""
        with self.sessions.begin() as session:
            self._lock_pauses(session, exclusive=False)
            row = session.get(BriefRow, brief_id, with_for_update=True)
            if row is None:
                raise UnknownBriefError(f"no brief with id {brief_id!r}")
            return _start_row(row, max_attempts, set(session.scalars(select(QueuePauseRow.scope))))

    def start_runs(self, brief_ids: list[str], owner: str, lease_s: float,
                   max_attempts: int) -> tuple[list[BriefRecord], dict[str, BriefRecord]]:
        """``acquire_lease`` then ``start_attempt`` for several briefs, all in one transaction: returns
        (the briefs ``owner`` now runs, the others as they are: held by another delivery, finished
        or cancelled, their lease given back). Unknown briefs are left out of both."""
        with self.sessions.begin() as session:
            self._lock_pauses(session, exclusive=False)
            rows = {row.id: row for row in session.scalars(
                select(BriefRow).where(BriefRow.id.in_(brief_ids)).order_by(BriefRow.id).with_for_update())}
            pauses = set(session.scalars(select(QueuePauseRow.scope)))
            leased = set(session.scalars(self._lease_statement(list(rows), owner, lease_s))) if rows else set()
            taken, others, given_back = [], {}, []
            for brief_id in (b for b in brief_ids if b in rows):
                if brief_id not in leased:
                    others[brief_id] = _to_record(rows[brief_id])
                    continue
                record = _start_row(rows[brief_id], max_attempts, pauses)
                if record.status == "running":
                    taken.append(record)
                else:
                    others[brief_id] = record
                    given_back.append(brief_id)
            if given_back:
                session.execute(update(BriefRunRow).where(BriefRunRow.brief_id.in_(given_back),
                                                          BriefRunRow.owner == owner).values(owner=None))
        return taken, others

    def finish_runs(self, outcomes: dict[str, tuple[BriefStatus, str | None]],
                    progress: dict[str, dict[str, Any]] | None = None) -> dict[str, BriefRecord]:
        """``finish`` for several briefs (id → (status, error)), with the last ``progress`` of those it
        names, in one transaction."""
        finished = {}
        with self.sessions.begin() as session:
            rows = {row.id: row for row in session.scalars(select(BriefRow).where(BriefRow.id.in_(list(outcomes))))}
            for brief_id, (status, error) in outcomes.items():
                row = rows[brief_id]
                if row.status not in TERMINAL_STATUSES:
                    row.status, row.error, row.finished_at = status, error, utcnow()
                    if progress and brief_id in progress:
                        row.progress = progress[brief_id]
                finished[brief_id] = _to_record(row)
        return finished

    # -- leases: one running delivery per brief -------------------------------------------
    def acquire_lease(self, brief_id: str, owner: str, lease_s: float) -> bool:
        """Take the brief's lease for ``owner`` if nobody holds it, its holder released it,
        or its heartbeat is older than ``lease_s``; one atomic upsert, so of two deliveries
        racing for a brief exactly one wins. True when ``owner`` holds it now."""
        statement = self._lease_statement([brief_id], owner, lease_s)
        try:
            with self.sessions.begin() as session:
                return session.execute(statement).scalar() == brief_id
        except IntegrityError:  # the foreign key: no such brief (one statement, no read before it)
            raise UnknownBriefError(f"no brief with id {brief_id!r}") from None

    def _lease_statement(self, brief_ids: list[str], owner: str, lease_s: float):
        """The atomic upsert that takes the free, released or lapsed leases of ``brief_ids``; returns
        the ids of those ``owner`` holds now (a lease another delivery holds returns no row)."""
        now = utcnow()
        lapsed = now - timedelta(seconds=lease_s)
        return (self._insert()(BriefRunRow).values([{"brief_id": b, "owner": owner, "heartbeat_at": now}
                                                    for b in brief_ids])
                .on_conflict_do_update(index_elements=["brief_id"], set_={"owner": owner, "heartbeat_at": now},
                                       where=(BriefRunRow.owner.is_(None)) | (BriefRunRow.owner == owner)
                                       | (BriefRunRow.heartbeat_at < lapsed))
                .returning(BriefRunRow.brief_id))

    def renew_lease(self, brief_id: str, owner: str) -> bool:
        """The holder's heartbeat. False when ``owner`` no longer holds the lease."""
        with self.sessions.begin() as session:
            result = session.execute(update(BriefRunRow).where(
                BriefRunRow.brief_id == brief_id, BriefRunRow.owner == owner).values(heartbeat_at=utcnow()))
            return result.rowcount == 1

    def release_lease(self, brief_id: str, owner: str) -> bool:
        """Give the lease up (the run ended, or its process died and the worker's main
        process says so): the next delivery may take the brief at once."""
        return bool(self.release_leases([brief_id], owner))

    def release_leases(self, brief_ids: list[str], owner: str, followups_queued: list[str] = ()) -> list[str]:
        """``release_lease`` for several briefs in one write, which also records the follow-ups
        queued for ``followups_queued`` (``mark_followups_queued``); returns the briefs released."""
        now = utcnow()
        with self.sessions.begin() as session:
            return list(session.scalars(update(BriefRunRow).where(
                BriefRunRow.brief_id.in_(brief_ids), BriefRunRow.owner == owner).values(
                owner=None, followups_at=case((BriefRunRow.brief_id.in_(list(followups_queued)), now),
                                              else_=BriefRunRow.followups_at)).returning(BriefRunRow.brief_id)))

    def release_leases_of(self, owner: str) -> list[str]:
        """Give up every lease ``owner`` holds (its process died while running several briefs
        together); returns those briefs."""
        with self.sessions.begin() as session:
            released = list(session.scalars(select(BriefRunRow.brief_id).where(BriefRunRow.owner == owner)))
            if released:
                session.execute(update(BriefRunRow).where(BriefRunRow.brief_id.in_(released),
                                                          BriefRunRow.owner == owner).values(owner=None))
            return released

    def lease_owner(self, brief_id: str) -> str | None:
        with self.sessions() as session:
            return session.scalar(select(BriefRunRow.owner).where(BriefRunRow.brief_id == brief_id))

    def followups_queued_among(self, brief_ids: list[str]) -> set[str]:
        """The briefs among ``brief_ids`` whose score and enrich tasks were sent (one query)."""
        with self.sessions() as session:
            return set(session.scalars(select(BriefRunRow.brief_id).where(
                BriefRunRow.brief_id.in_(brief_ids), BriefRunRow.followups_at.is_not(None))))

    def mark_followups_queued(self, brief_ids: list[str]) -> None:
        """Record that the finished briefs' score and enrich tasks were sent (one transaction)."""
        if not brief_ids:
            return
        now = utcnow()
        statement = (self._insert()(BriefRunRow).values([{"brief_id": b, "owner": None, "heartbeat_at": now,
                                                          "followups_at": now} for b in brief_ids])
                     .on_conflict_do_update(index_elements=["brief_id"], set_={"followups_at": now}))
        with self.sessions.begin() as session:
            session.execute(statement)

    def update_progress(self, brief_id: str, progress: dict[str, Any]) -> None:
        self._update(brief_id, progress=progress)

    def finish(self, brief_id: str, status: BriefStatus, error: str | None = None,
               progress: dict[str, Any] | None = None) -> BriefRecord:
        """End the brief (a finished one is left as it is), with its last ``progress`` in the same write."""
        with self.sessions.begin() as session:
            row = session.get(BriefRow, brief_id)
            if row.status not in TERMINAL_STATUSES:
                row.status, row.error, row.finished_at = status, error, utcnow()
                if progress is not None:
                    row.progress = progress
            return _to_record(row)

    def request_cancel(self, brief_id: str) -> BriefRecord:
        """Ask for a brief to stop: a queued brief is cancelled at once, a running one
        at its next denoising step; a finished one is left as it is."""
        with self.sessions.begin() as session:
            row = session.get(BriefRow, brief_id, with_for_update=True)
            if row is None:
                raise UnknownBriefError(f"no brief with id {brief_id!r}")
            if row.status not in TERMINAL_STATUSES:
                row.cancel_requested = True
                if row.status in WAITING_STATUSES:
                    row.status, row.finished_at = "cancelled", utcnow()
            return _to_record(row)

    def update_progress_many(self, progress: dict[str, dict[str, Any]]) -> None:
        """``update_progress`` for several briefs (denoised in one call), in one transaction."""
        if not progress:
            return
        with self.sessions.begin() as session:
            for brief_id, values in progress.items():
                session.execute(update(BriefRow).where(BriefRow.id == brief_id).values(progress=values))

    def cancel_requested_among(self, brief_ids: list[str]) -> set[str]:
        """The briefs among ``brief_ids`` whose cancel was requested (one query)."""
        if not brief_ids:
            return set()
        with self.sessions() as session:
            return set(session.scalars(select(BriefRow.id).where(BriefRow.id.in_(brief_ids),
                                                                 BriefRow.cancel_requested.is_(True))))

    def is_cancel_requested(self, brief_id: str) -> bool:
        with self.sessions() as session:
            return bool(session.scalar(select(BriefRow.cancel_requested).where(BriefRow.id == brief_id)))

    def _update(self, brief_id: str, **values: Any) -> None:
        with self.sessions.begin() as session:
            session.execute(update(BriefRow).where(BriefRow.id == brief_id).values(**values))

    # -- items ------------------------------------------------------------------------
    def existing_variants(self, brief_id: str) -> set[int]:
        with self.sessions() as session:
            return set(session.scalars(select(ItemRow.variant).where(ItemRow.brief_id == brief_id)))

    def add_items(self, items: list[NewItem]) -> int:
        """Insert items in one transaction, skipping (brief, variant) pairs that exist."""
        if not items:
            return 0
        rows = [{**item.model_dump(), "id": item_id(item.brief_id, item.variant), "created_at": utcnow()} for item in items]
        insert = self._insert()
        statement = (insert(ItemRow).values(rows)
                     .on_conflict_do_nothing(index_elements=["brief_id", "variant"]).returning(ItemRow.id))
        with self.sessions.begin() as session:
            return len(session.execute(statement).all())

    def list_items(self, brief_id: str) -> list[ItemRecord]:
        with self.sessions() as session:
            rows = session.scalars(select(ItemRow).where(ItemRow.brief_id == brief_id).order_by(ItemRow.variant))
            return [ItemRecord.model_validate(r, from_attributes=True) for r in rows]

    def list_items_of(self, brief_ids: list[str]) -> dict[str, list[ItemRecord]]:
        """``list_items`` of several briefs in one query: brief id → its items by variant."""
        found: dict[str, list[ItemRecord]] = {brief_id: [] for brief_id in brief_ids}
        with self.sessions() as session:
            for row in session.scalars(select(ItemRow).where(ItemRow.brief_id.in_(brief_ids))
                                       .order_by(ItemRow.brief_id, ItemRow.variant)):
                found[row.brief_id].append(ItemRecord.model_validate(row, from_attributes=True))
        return found

    def get_items(self, item_ids: list[str]) -> list[ItemRecord]:
        """The generated items among ``item_ids`` (other ids, such as catalog products', are left out)."""
        with self.sessions() as session:
            rows = session.scalars(select(ItemRow).where(ItemRow.id.in_(item_ids)))
            return [ItemRecord.model_validate(r, from_attributes=True) for r in rows]

    def find_items(self, designer: str, query: ItemQuery) -> tuple[list[ItemRecord], int]:
        """The designer's generated items that match ``query``, one page in its order, and how many
        match in all. Sorting by score uses the group's best score (one per reward model)."""
        score = (select(ScoreRow.item_id, func.max(ScoreRow.score).label("score"))
                 .where(ScoreRow.group_id == query.group).group_by(ScoreRow.item_id).subquery())
        where = [BriefRow.designer == designer]
        if query.text:
            escaped = query.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(ItemRow.prompt.ilike(f"%{escaped}%", escape="\\"))
        if query.seed is not None:
            where.append(ItemRow.seed == query.seed)
        if query.model == "base":
            where.append(~ItemRow.model_id.contains("+lora:", autoescape=True))
        elif query.model:
            where.append(ItemRow.model_id.endswith(f"+{query.model}", autoescape=True))
        if query.status:
            where.append(BriefRow.status == query.status)
        if query.since:
            where.append(ItemRow.created_at >= query.since)
        if query.until:
            where.append(ItemRow.created_at <= query.until)
        if query.min_score is not None:
            where.append(score.c.score >= query.min_score)
        base = select(ItemRow).join(BriefRow, BriefRow.id == ItemRow.brief_id)
        if query.group is not None:
            base = base.outerjoin(score, score.c.item_id == ItemRow.id)
        base = base.where(*where)
        order = {"newest": [ItemRow.created_at.desc(), ItemRow.variant], "oldest": [ItemRow.created_at, ItemRow.variant],
                 "seed": [ItemRow.seed, ItemRow.created_at.desc()],
                 "score": [score.c.score.is_(None), score.c.score.desc(), ItemRow.created_at.desc()]}[query.sort]
        with self.sessions() as session:
            total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
            rows = session.scalars(base.order_by(*order, ItemRow.id).offset(query.offset).limit(query.limit))
            return [ItemRecord.model_validate(r, from_attributes=True) for r in rows], total

    # -- picks: designers' choices on variants ------------------------------------------
    def set_picks(self, item_id: str, designer: str, groups: list[str], choice: PickChoice | None) -> list[PickRecord]:
        """Record the designer's choice on an item for each of ``groups`` (None: withdraw it); a new
        choice for an item and group replaces the one before. Returns the item's picks by the designer."""
        item = self.get_items([item_id])
        if not item:
            raise LookupError(f"no item with id {item_id!r}")
        now = utcnow()
        with self.sessions.begin() as session:
            if choice is None:
                session.execute(delete(PickRow).where(PickRow.item_id == item_id, PickRow.designer == designer,
                                                      PickRow.group_id.in_(groups)))
            else:
                rows = [{"item_id": item_id, "brief_id": item[0].brief_id, "designer": designer, "group_id": group,
                         "choice": choice, "created_at": now, "updated_at": now} for group in groups]
                session.execute(self._insert()(PickRow).values(rows).on_conflict_do_update(
                    index_elements=["item_id", "group_id", "designer"], set_={"choice": choice, "updated_at": now}))
        return self.list_picks(designer=designer, item_ids=[item_id])

    def list_picks(self, designer: str | None = None, brief_ids: list[str] | None = None,
                   item_ids: list[str] | None = None) -> list[PickRecord]:
        query = select(PickRow)
        if designer is not None:
            query = query.where(PickRow.designer == designer)
        if brief_ids is not None:
            query = query.where(PickRow.brief_id.in_(brief_ids))
        if item_ids is not None:
            query = query.where(PickRow.item_id.in_(item_ids))
        with self.sessions() as session:
            rows = session.scalars(query.order_by(PickRow.brief_id, PickRow.group_id, PickRow.item_id))
            return [PickRecord.model_validate(r, from_attributes=True) for r in rows]

    # -- scores -----------------------------------------------------------------------
    def add_scores(self, scores: list[NewScore]) -> int:
        """Insert scores, skipping (item, group, model) triples already scored."""
        if not scores:
            return 0
        insert = self._insert()
        rows = [{**score.model_dump(), "created_at": utcnow()} for score in scores]
        statement = (insert(ScoreRow).values(rows).on_conflict_do_nothing(
            index_elements=["item_id", "group_id", "reward_model"]).returning(ScoreRow.id))
        with self.sessions.begin() as session:
            return len(session.execute(statement).all())

    def list_item_scores(self, item_ids: list[str]) -> list[ScoreRecord]:
        with self.sessions() as session:
            rows = session.scalars(select(ScoreRow).where(ScoreRow.item_id.in_(item_ids)).order_by(ScoreRow.group_id))
            return [ScoreRecord.model_validate(r, from_attributes=True) for r in rows]

    def list_scores(self, brief_id: str) -> list[ScoreRecord]:
        with self.sessions() as session:
            rows = session.scalars(select(ScoreRow).join(ItemRow, ItemRow.id == ScoreRow.item_id)
                                   .where(ItemRow.brief_id == brief_id).order_by(ItemRow.variant, ScoreRow.group_id))
            return [ScoreRecord.model_validate(r, from_attributes=True) for r in rows]

    def list_scores_of(self, brief_ids: list[str]) -> dict[str, list[ScoreRecord]]:
        """``list_scores`` of several briefs in one query: brief id → its scores."""
        found: dict[str, list[ScoreRecord]] = {brief_id: [] for brief_id in brief_ids}
        with self.sessions() as session:
            rows = session.execute(select(ScoreRow, ItemRow.brief_id).join(ItemRow, ItemRow.id == ScoreRow.item_id)
                                   .where(ItemRow.brief_id.in_(brief_ids))
                                   .order_by(ItemRow.brief_id, ItemRow.variant, ScoreRow.group_id))
            for score, brief_id in rows:
                found[brief_id].append(ScoreRecord.model_validate(score, from_attributes=True))
        return found

    # -- catalog products ---------------------------------------------------------------
    def add_catalog_products(self, products: list[NewCatalogProduct]) -> int:
        """Insert products in one transaction, skipping product ids already imported."""
        if not products:
            return 0
        rows = [{**p.model_dump(), "id": catalog_product_id(p.product_id), "created_at": utcnow()} for p in products]
        statement = (self._insert()(CatalogProductRow).values(rows)
                     .on_conflict_do_nothing(index_elements=["product_id"]).returning(CatalogProductRow.id))
        with self.sessions.begin() as session:
            return len(session.execute(statement).all())

    def get_catalog_products(self, ids: list[str]) -> list[CatalogProductRecord]:
        with self.sessions() as session:
            rows = session.scalars(select(CatalogProductRow).where(CatalogProductRow.id.in_(ids)))
            return [CatalogProductRecord.model_validate(r, from_attributes=True) for r in rows]

    # -- understandings ----------------------------------------------------------------
    def add_understandings(self, understandings: list[NewUnderstanding]) -> int:
        """Insert, skipping (item, embedding model) pairs already understood."""
        if not understandings:
            return 0
        rows = [{**u.model_dump(), "created_at": utcnow()} for u in understandings]
        statement = (self._insert()(UnderstandingRow).values(rows)
                     .on_conflict_do_nothing(index_elements=["item_id", "embedding_model"])
                     .returning(UnderstandingRow.id))
        with self.sessions.begin() as session:
            return len(session.execute(statement).all())

    def list_understandings(self, item_ids: list[str], embedding_model: str | None = None) -> list[UnderstandingRecord]:
        query = select(UnderstandingRow).where(UnderstandingRow.item_id.in_(item_ids))
        if embedding_model is not None:
            query = query.where(UnderstandingRow.embedding_model == embedding_model)
        with self.sessions() as session:
            return [UnderstandingRecord.model_validate(r, from_attributes=True) for r in session.scalars(query)]

    # -- catalog reads -------------------------------------------------------------------
    def list_catalog_products(self) -> list[CatalogProductRecord]:
        with self.sessions() as session:
            rows = session.scalars(select(CatalogProductRow).order_by(CatalogProductRow.product_id))
            return [CatalogProductRecord.model_validate(r, from_attributes=True) for r in rows]

    # -- experiments ---------------------------------------------------------------------
    def save_experiment(self, experiment_id: str, manifest: dict[str, Any], export_dir: str) -> ExperimentRecord:
        """Record an export; re-exporting an experiment (``--force``) replaces its manifest,
        unless results were already imported against the old one."""
        with self.sessions.begin() as session:
            row = session.get(ExperimentRow, experiment_id)
            if row is not None:
                imported = session.scalar(select(func.count()).select_from(AbResultRow)
                                          .where(AbResultRow.experiment_id == experiment_id)) or 0
                if imported:
                    raise ValueError(f"experiment {experiment_id!r} already has {imported} imported result rows; "
                                     "export under a new experiment id")
                row.manifest, row.export_dir = manifest, export_dir
            else:
                row = ExperimentRow(id=experiment_id, manifest=manifest, export_dir=export_dir, created_at=utcnow())
                session.add(row)
            session.flush()
            return ExperimentRecord.model_validate(row, from_attributes=True)

    def get_experiment(self, experiment_id: str) -> ExperimentRecord:
        with self.sessions() as session:
            row = session.get(ExperimentRow, experiment_id)
            if row is None:
                raise UnknownExperimentError(f"no experiment with id {experiment_id!r}")
            return ExperimentRecord.model_validate(row, from_attributes=True)

    def replace_ab_results(self, experiment_id: str, results: list[AbResult]) -> int:
        """Store an experiment's results in one transaction, replacing any imported before."""
        rows = [{**r.model_dump(), "imported_at": utcnow()} for r in results]
        with self.sessions.begin() as session:
            session.execute(delete(AbResultRow).where(AbResultRow.experiment_id == experiment_id))
            if rows:
                session.execute(self._insert()(AbResultRow).values(rows))
        return len(rows)

    def list_ab_results(self, experiment_id: str) -> list[AbResult]:
        with self.sessions() as session:
            rows = session.scalars(select(AbResultRow).where(AbResultRow.experiment_id == experiment_id)
                                   .order_by(AbResultRow.arm, AbResultRow.listing_id, AbResultRow.group_id))
            return [AbResult.model_validate(r, from_attributes=True) for r in rows]

    def _insert(self):
        """The dialect's INSERT, which has ON CONFLICT DO NOTHING (SQLite and PostgreSQL)."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert

    def image_in_use(self, sha256: str) -> bool:
        """Whether any item or catalog product refers to the image with this digest."""
        with self.sessions() as session:
            return bool(session.scalar(select(ItemRow.id).where(ItemRow.image_sha256 == sha256).limit(1))
                        or session.scalar(select(CatalogProductRow.id).where(
                            CatalogProductRow.image_sha256 == sha256).limit(1)))

    def count_items(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(ItemRow)) or 0


def open_store() -> Store:
    """The store named by the settings (``GENSHOP_DATABASE_URL`` and ``GENSHOP_HOME``)."""
    from genshop.settings import get_settings

    settings = get_settings()
    return Store(settings.database_url, settings.home, settings.images_url)
