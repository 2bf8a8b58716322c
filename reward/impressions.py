"""Impressions: the preference data a group reward model learns from, and its on-disk format.

An impression is one showing of K >= 2 candidate images together to a customer of one
group, for one brief, and what happened: the item chosen, or none. Pairwise preferences
are the K = 2 case.

Format, version 1 (Parquet; the file's schema metadata holds ``genshop.impressions.version``):

| column | type | |
| --- | --- | --- |
| impression_id | string | unique within a file |
| group_id | string | a group id from ``configs/groups.yaml`` |
| brief | string | the brief / prompt text the candidates were made for |
| items | list<string> | the K shown items: catalog product ids or image file paths, in display order |
| chosen | string, null | the chosen item (one of ``items``), null for "chose none" |
| clicks | list<int64>, null | optional per-item click counts (length K) |
| purchases | list<int64>, null | optional per-item purchase counts (length K) |
| timestamp | timestamp[us, UTC], null | when it was shown (null: not known) |
| source | string | ``simulated``, ``ab_import`` or ``manual`` |
| sim_probabilities | list<float64>, null | simulator ground truth only: P(item k) for each shown item, then P(none) |
| sim_disagree_any | bool, null | simulator only: the groups' most likely picks among these items differ |
| sim_disagree_population | bool, null | simulator only: this group's most likely pick is not the population's |

The ``sim_*`` columns are written by ``genshop simulate`` for reporting the Bayes-optimal
ceiling; models never read them. Clicks and purchases are stored and validated but not yet
used by the losses.

JSONL (one object per line with the same fields; ``timestamp`` as ISO 8601 or Unix seconds),
CSV (a header row; list cells as a JSON list or ``|``-separated, empty cells missing) and
Parquet from elsewhere are accepted by ``import_impressions``. A log with its own column
names is read through a column mapping (``columns``: field → the file's column, e.g.
``{"brief": "prompt", "items": "shown"}``; ``--columns brief=prompt,items=shown``), and
columns the format does not have are named in the error. ``import_impressions`` which validates every row first and writes nothing
unless all rows are valid: unknown items or groups, K < 2, a chosen item not among those
shown, an item shown twice, per-item counts of the wrong length and duplicate impression ids
are reported with the row (1-based) and impression id.

Hostile input is refused row by row too (``genshop reward import`` exits 2): bytes that are
not UTF-8, JSON nested too deeply, a Parquet file that cannot be read; numbers must be
finite (NaN and ±Infinity are refused), counts at most ``MAX_COUNT``, timestamps Unix
seconds from 1970 through 9999 (``MAX_UNIX_SECONDS``); strings are bounded: ``brief`` at most
``MAX_BRIEF_CHARS`` characters, an item ``MAX_ITEM_CHARS``, at most ``MAX_ITEMS`` items shown.
An item that is not a known catalog product id is an image path (relative to the source
file's folder, or absolute) that must lie, after resolving links and ``..``, inside one of
the image folders the caller names (``image_roots``; ``--images-root``, default: the
source file's folder), and must be an image Pillow opens and verifies.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMAT_VERSION = 1
VERSION_KEY = b"genshop.impressions.version"
SOURCES = ("simulated", "ab_import", "manual")
MAX_LISTED_ISSUES = 20
MAX_BRIEF_CHARS = 4000
MAX_ITEM_CHARS = 1024  # a catalog product id or an image path
MAX_ITEMS = 100  # K, the items shown in one impression
MAX_COUNT = 10**15  # per-item clicks and purchases: far inside int64
MAX_UNIX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z

ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ITEM_CHARS)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]

SCHEMA = pa.schema([
    ("impression_id", pa.string()),
    ("group_id", pa.string()),
    ("brief", pa.string()),
    ("items", pa.list_(pa.string())),
    ("chosen", pa.string()),
    ("clicks", pa.list_(pa.int64())),
    ("purchases", pa.list_(pa.int64())),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("source", pa.string()),
    ("sim_probabilities", pa.list_(pa.float64())),
    ("sim_disagree_any", pa.bool_()),
    ("sim_disagree_population", pa.bool_()),
], metadata={VERSION_KEY: str(FORMAT_VERSION).encode()})
COLUMNS = SCHEMA.names
OPTIONAL_COLUMNS = ("clicks", "purchases", "sim_probabilities", "sim_disagree_any", "sim_disagree_population")


class ImpressionFormatError(ValueError):
    """A file that is not an impressions file of a supported version."""


class ImpressionValidationError(ValueError):
    """Rows that failed validation; ``issues`` names each row. Nothing was written."""

    def __init__(self, source: str, issues: list[str]):
        self.source, self.issues = source, issues
        listed = issues[:MAX_LISTED_ISSUES]
        more = f"\n  ... and {len(issues) - len(listed)} more" if len(issues) > len(listed) else ""
        super().__init__(f"{source}: {len(issues)} invalid row(s), nothing imported:\n  " + "\n  ".join(listed) + more)


class Impression(BaseModel):
    """One impression row, validated on its own (cross-row checks are in ``validate_impressions``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    impression_id: str = Field(min_length=1, max_length=200)
    group_id: str = Field(min_length=1, max_length=64)
    brief: str = Field(default="", max_length=MAX_BRIEF_CHARS)
    items: list[ItemId] = Field(max_length=MAX_ITEMS)
    chosen: ItemId | None = None
    clicks: list[Count] | None = Field(default=None, max_length=MAX_ITEMS)
    purchases: list[Count] | None = Field(default=None, max_length=MAX_ITEMS)
    timestamp: datetime | None = Field(default=None, description="when it was shown; None: not known")
    source: Literal["simulated", "ab_import", "manual"]
    sim_probabilities: list[Probability] | None = Field(default=None, max_length=MAX_ITEMS + 1)
    sim_disagree_any: bool | None = None
    sim_disagree_population: bool | None = None

    @field_validator("items")
    @classmethod
    def _at_least_two(cls, items: list[str]) -> list[str]:
        if len(items) < 2:
            raise ValueError(f"K = {len(items)} items shown; an impression needs K >= 2")
        if any(not item for item in items):
            raise ValueError("an empty item id")
        if len(set(items)) != len(items):
            duplicate = next(item for item in items if items.count(item) > 1)
            raise ValueError(f"item {duplicate!r} is shown twice")
        return items

    @field_validator("timestamp", mode="before")
    @classmethod
    def _unix_seconds(cls, value):
        """Numbers are Unix seconds (never milliseconds, as pydantic would guess for large ones)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and 0 <= value <= MAX_UNIX_SECONDS):
                raise ValueError(f"{value!r} is not a Unix time in seconds from 1970 through 9999")
            return datetime.fromtimestamp(value, tz=timezone.utc)
        return value

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> "Impression":
        k = len(self.items)
        if self.chosen is not None and self.chosen not in self.items:
            raise ValueError(f"chosen item {self.chosen!r} is not among the {k} items shown")
        for name in ("clicks", "purchases"):
            counts = getattr(self, name)
            if counts is not None and (len(counts) != k or min(counts) < 0):
                raise ValueError(f"{name} must hold {k} non-negative counts, one per item shown")
        if self.sim_probabilities is not None and len(self.sim_probabilities) != k + 1:
            raise ValueError(f"sim_probabilities must hold {k + 1} values (each item, then none)")
        return self


# ---------------------------------------------------------------- reading raw rows

def _plain(value):
    """Parquet/pandas cell → plain Python (lists, None for missing, datetimes)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


LIST_FIELDS = ("items", "clicks", "purchases", "sim_probabilities")


def parse_column_mapping(text: str) -> dict[str, str]:
    """``brief=prompt,items=shown`` → ``{"brief": "prompt", "items": "shown"}`` (format field → file column)."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not field or not column:
            raise ImpressionFormatError(f"column mapping {part!r}: expected FIELD=COLUMN, e.g. brief=prompt")
        if field not in COLUMNS:
            raise ImpressionFormatError(f"column mapping {part!r}: {field!r} is not an impressions field "
                                        f"({', '.join(COLUMNS)})")
        if field in mapping:
            raise ImpressionFormatError(f"column mapping: {field!r} is mapped twice")
        mapping[field] = column
    return mapping


def rename_columns(rows: list[dict | None], columns: dict[str, str]) -> list[dict | None]:
    """Each row with the file's column names replaced by the format's (``columns``: field → column)."""
    if not columns:
        return rows
    by_column = {column: field for field, column in columns.items()}
    return [None if row is None else {by_column.get(key, key): value for key, value in row.items()} for row in rows]


def _csv_cell(field: str, value: str):
    """A CSV cell as the value the format expects: empty is missing; lists are JSON or ``|``-separated."""
    if value == "":
        return None
    if field in LIST_FIELDS:
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                return value  # the schema names it
        return [part.strip() for part in value.split("|")]
    if field == "timestamp":
        try:
            return float(value)
        except ValueError:
            return value  # ISO 8601
    return value


def _read_csv_rows(path: Path, columns: dict[str, str]) -> tuple[list[dict | None], list[str]]:
    import csv
    import io

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], [f"not UTF-8 text (invalid byte at offset {exc.start})"]
    by_column = {column: field for field, column in columns.items()}
    rows: list[dict | None] = []
    issues: list[str] = []
    try:
        for number, record in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1):
            if None in record:  # more cells than the header names
                issues.append(f"row {number}: {len(record[None])} more cell(s) than the header names")
                rows.append(None)
                continue
            rows.append({by_column.get(k, k): _csv_cell(by_column.get(k, k), v or "") for k, v in record.items()})
    except csv.Error as exc:
        issues.append(f"not valid CSV ({exc})")
    return rows, issues


REQUIRED_FIELDS = ("impression_id", "group_id", "items", "source")


def column_issues(rows: list[dict | None], default_source: str | None = None) -> list[str]:
    """File-level problems with the columns, said once rather than on every row: columns the
    format does not have (map them with ``columns``) and required fields no row carries."""
    seen: dict[str, None] = {}
    for row in rows:
        if row is not None:
            seen.update(dict.fromkeys(row))
    if not seen:
        return []
    issues = []
    unknown = [name for name in seen if name not in COLUMNS]
    if unknown:
        issues.append(f"column(s) {', '.join(repr(u[:100]) for u in unknown[:10])} are not impressions fields; map "
                      f"them with --columns FIELD=COLUMN (e.g. brief=prompt,items=shown) or drop them "
                      f"(fields: {', '.join(COLUMNS)})")
    missing = [f for f in REQUIRED_FIELDS if f not in seen and not (f == "source" and default_source)]
    if missing:
        issues.append(f"no column for required field(s) {', '.join(missing)}"
                      + ("; --source-default gives rows a source" if "source" in missing else ""))
    return issues


def read_raw_rows(path: str | Path, columns: dict[str, str] | None = None) -> tuple[list[dict | None], list[str]]:
    """Rows of a JSONL, CSV or Parquet file as dicts with the format's field names (``columns``:
    field → the file's column), plus issues for lines that cannot be read as rows."""
    path = Path(path)
    columns = columns or {}
    if path.suffix.lower() == ".csv":
        return _read_csv_rows(path, columns)
    rows, issues = _read_json_or_parquet_rows(path)
    return rename_columns(rows, columns), issues


def _read_json_or_parquet_rows(path: Path) -> tuple[list[dict | None], list[str]]:
    rows: list[dict | None] = []
    issues: list[str] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                issues.append(f"row {number}: not UTF-8 text (invalid byte at offset {exc.start})")
                rows.append(None)
                continue
            if not line.strip():
                rows.append(None)  # keeps row numbers equal to line numbers
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                issues.append(f"row {number}: not valid JSON ({exc.msg})")
                rows.append(None)
                continue
            except RecursionError:
                issues.append(f"row {number}: JSON nested too deeply")
                rows.append(None)
                continue
            if not isinstance(row, dict):
                issues.append(f"row {number}: expected a JSON object")
                rows.append(None)
                continue
            rows.append(row)
        return rows, issues
    try:
        frame = pd.read_parquet(path)
        records = frame.to_dict("records")
    except (OSError, ValueError, pa.ArrowException) as exc:  # truncated, corrupt, or not Parquet at all
        raise ImpressionFormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                                    f"{str(exc)[:200]})") from None
    for record in records:
        rows.append({key: _plain(value) for key, value in record.items()})
    return rows, issues


# ---------------------------------------------------------------- validation

def _describe(number: int, row: dict | None) -> str:
    impression_id = row.get("impression_id") if isinstance(row, dict) else None
    if not isinstance(impression_id, str) or len(impression_id) > 200:
        impression_id = None  # not a valid id: not worth repeating
    return f"row {number}" + (f" (impression {impression_id!r})" if impression_id else "")


def is_image(path: Path) -> bool:
    """Pillow opens and verifies the file, within its decompression-bomb limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()
        return True
    except Exception:  # noqa: BLE001 - whatever Pillow raises, it is not an image we can use
        return False


def validate_impressions(rows: list[dict | None], known_items: set[str] | None = None,
                         known_groups: set[str] | None = None, base_dir: Path | None = None,
                         existing_ids: Iterable[str] = (), default_source: str | None = None,
                         first_row: int = 1, image_roots: Iterable[str | Path] | None = None
                         ) -> tuple[list[Impression], list[str]]:
    """Validate every row; returns the impressions and every issue found (each naming its row).

    An item is known when it is in ``known_items`` (catalog product ids) or is the path of an
    image file (absolute, or relative to ``base_dir``) inside one of ``image_roots`` (default:
    ``base_dir``) that Pillow can open, which is then stored absolute. ``known_items=None`` and
    ``known_groups=None`` skip those checks.
    """
    issues: list[str] = []
    impressions: list[Impression] = []
    first_seen = {impression_id: "the existing file" for impression_id in existing_ids}
    roots = [Path(root).resolve() for root in (image_roots if image_roots is not None else
                                                [base_dir] if base_dir is not None else [])]
    path_cache: dict[str, tuple[str | None, str]] = {}

    def resolve(item: str) -> tuple[str | None, str]:
        """(the stored item, or None and why not)."""
        if known_items is not None and item in known_items:
            return item, ""
        if item not in path_cache:
            candidate = Path(item)
            if not candidate.is_absolute() and base_dir is not None:
                candidate = base_dir / candidate
            try:
                resolved = candidate.resolve()
                if not any(resolved.is_relative_to(root) for root in roots):  # not even looked at
                    path_cache[item] = None, "outside"
                elif not resolved.is_file():
                    path_cache[item] = None, "missing"
                elif not is_image(resolved):
                    path_cache[item] = None, "not an image"
                else:
                    path_cache[item] = str(resolved), ""
            except (OSError, ValueError):  # a NUL byte, a name too long
                path_cache[item] = None, "missing"
        return path_cache[item]

    for offset, row in enumerate(rows):
        number = first_row + offset
        if row is None:
            continue  # already reported by the reader
        where = _describe(number, row)
        fields = dict(row)
        if default_source and not fields.get("source"):
            fields["source"] = default_source
        try:
            impression = Impression.model_validate(fields)
        except ValidationError as exc:
            for error in exc.errors():
                location = ".".join(str(p) for p in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                issues.append(f"{where}: {location + ': ' if location else ''}{message}")
            continue
        row_issues = []
        if impression.impression_id in first_seen:
            row_issues.append(f"duplicate impression id, first seen in {first_seen[impression.impression_id]}")
        else:
            first_seen[impression.impression_id] = f"row {number}"
        if known_groups is not None and impression.group_id not in known_groups:
            row_issues.append(f"unknown group {impression.group_id!r} (known: {', '.join(sorted(known_groups))})")
        found = [resolve(item) for item in impression.items]
        resolved = [path for path, _ in found]
        for reason, problem in (("missing", "neither a catalog product id nor an existing image file"),
                                ("outside", "not catalog product ids, and outside the image folders "
                                            f"({', '.join(map(str, roots)) or 'none named'})"),
                                ("not an image", "file(s) that are not images")):
            bad = [item for item, (_, why) in zip(impression.items, found) if why == reason]
            if bad:
                label = "unknown item(s)" if reason == "missing" else "item(s)"
                row_issues.append(f"{label} {', '.join(repr(i[:200]) for i in bad[:5])}: {problem}")
        issues += [f"{where}: {issue}" for issue in row_issues]
        if not row_issues:
            if resolved != impression.items:
                mapping = dict(zip(impression.items, resolved))
                impression = impression.model_copy(update={
                    "items": resolved, "chosen": None if impression.chosen is None else mapping[impression.chosen]})
            impressions.append(impression)
    return impressions, issues


# ---------------------------------------------------------------- the file format

def impressions_frame(impressions: Iterable[Impression]) -> pd.DataFrame:
    return pd.DataFrame([impression.model_dump() for impression in impressions], columns=COLUMNS)


def _table(frame: pd.DataFrame) -> pa.Table:
    frame = frame.copy()
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    return pa.Table.from_pandas(frame[COLUMNS], schema=SCHEMA, preserve_index=False)


def write_impressions(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write an impressions frame as a version-1 Parquet file, atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(_table(frame), tmp, compression="zstd")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_impressions_jsonl(frame: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in frame.to_dict("records"):
            record = {key: _plain(value) for key, value in record.items()}
            if record.get("timestamp") is not None:
                record["timestamp"] = pd.Timestamp(record["timestamp"]).isoformat()
            f.write(json.dumps({k: v for k, v in record.items() if v is not None}) + "\n")
    tmp.replace(path)
    return path


def read_impressions(path: str | Path) -> pd.DataFrame:
    """A version-1 impressions Parquet file as a frame (``items`` as lists of str)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImpressionFormatError(f"{path}: not a Parquet file ({exc})") from None
    version = (table.schema.metadata or {}).get(VERSION_KEY)
    if version is None:
        raise ImpressionFormatError(f"{path}: no {VERSION_KEY.decode()} in the schema metadata; "
                                    f"import JSONL or foreign Parquet with `genshop reward import`")
    if int(version) != FORMAT_VERSION:
        raise ImpressionFormatError(f"{path}: impressions format version {int(version)} is not supported "
                                    f"(expected {FORMAT_VERSION})")
    missing = [c for c in COLUMNS if c not in table.schema.names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ImpressionFormatError(f"{path}: missing column(s) {', '.join(missing)}")
    frame = table.to_pandas()
    frame["items"] = [list(items) for items in frame["items"]]
    return frame


def read_impression_files(paths: Iterable[str | Path]) -> pd.DataFrame:
    frames = [read_impressions(path) for path in paths]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


class ImportReport(BaseModel):
    source: str
    out: str
    imported: int
    total: int


def import_impressions(source: str | Path, out: str | Path, known_items: set[str] | None = None,
                       known_groups: set[str] | None = None, append: bool = False,
                       default_source: str | None = None,
                       image_roots: Iterable[str | Path] | None = None,
                       columns: dict[str, str] | None = None) -> ImportReport:
    """Validate a JSONL or Parquet file of impressions and write it as version-1 Parquet to ``out``.

    All or nothing: any invalid row raises ``ImpressionValidationError`` (every bad row named)
    and ``out`` is left as it was. With ``append`` the rows are added to an existing ``out``
    and their ids must not repeat its ids. Image items must lie inside ``image_roots``
    (default: the source file's folder). ``columns`` maps format fields to the file's column
    names (``{"brief": "prompt"}``); the file's other columns must be format fields.
    """
    source, out = Path(source), Path(out)
    rows, issues = read_raw_rows(source, columns)
    if header := column_issues(rows, default_source):
        raise ImpressionFormatError(f"{source}: " + "; ".join(header))
    existing = read_impressions(out) if append and out.exists() else None
    impressions, row_issues = validate_impressions(
        rows, known_items, known_groups, base_dir=source.parent,
        existing_ids=() if existing is None else existing["impression_id"].tolist(), default_source=default_source,
        image_roots=image_roots)
    issues += row_issues
    if not any(row is not None for row in rows):
        issues.append("no impressions in the file")
    if issues:
        raise ImpressionValidationError(str(source), issues)
    frame = impressions_frame(impressions)
    if existing is not None:
        frame = pd.concat([existing[COLUMNS], frame], ignore_index=True)
    write_impressions(frame, out)
    return ImportReport(source=str(source), out=str(out), imported=len(impressions), total=len(frame))
