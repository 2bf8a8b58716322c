"""A persisted vector index over L2-normalised float32 vectors: inner product = cosine.

``VectorIndex`` maps our string item ids (uuid strings) to dense int64 faiss labels and
keeps per-item metadata (``str → str``: master_category, article_type, colour, gender,
kind=catalog|generated, ...) beside the vectors. Vectors are normalised on the way in,
queries too, so every score is a cosine similarity.

Two faiss indexes, both wrapped in ``IndexIDMap2`` (our labels, not faiss positions):

- below ``IndexConfig.exact_below`` live items: ``IndexFlatIP``, exact. ``delete`` removes
  the vectors (``remove_ids``).
- at or above it: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``, approximate. HNSW cannot
  remove, so ``delete`` leaves the vector in the graph as a tombstone and searches filter
  it out, over-fetching to still return ``k`` hits. The one move from flat to HNSW happens
  inside the ``add`` that crosses the threshold: the live vectors are copied out of the
  flat index into a new graph (one rebuild, seconds at the default 50,000). The index
  stays HNSW if deletes take it back below the threshold; ``compact`` rebuilds without the
  tombstones and picks the kind by the live count again.

Adding an id that is already there replaces it (the old vector is removed or tombstoned,
the new one gets a fresh label). Filters (``{"gender": "Women", "colour": ["Red", "Pink"]}``:
every field must match one of its values) are answered in two ways:

- exactly over the matching items (faiss's flat scan restricted to them by an id
  selector): always in the flat index, and in HNSW when few items match
  (``filter_exact_below``) or when the over-fetch needed would be too large (``max_fetch``);
- otherwise HNSW is asked for ``k × overfetch / (fraction of stored items allowed)``
  candidates, the ones filtered out are dropped, and any query still short of ``k`` hits
  is answered exactly over the allowed items. So a filtered query returns ``k`` hits
  whenever ``k`` matching items exist.

``save(folder)`` writes the faiss index and the items (parquet: label, id, one column per
metadata field) under fresh names, then commits them by replacing ``manifest.json``
(config, kind, tombstones, file names) with a rename; a crash anywhere before that rename
leaves the previous manifest and its files in place, so the old index stays loadable.
A ``load`` whose files a committing save removes under it starts again on the new manifest.

Bad input (wrong dimension, non-finite or zero vectors, empty or non-string ids,
duplicate ids in one add, malformed metadata or filters, ``k < 1``) raises
``IndexInputError`` naming the field, before anything is changed.

Not thread-safe for writers: one writer at a time, and no searches during a write.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

IndexKind = Literal["flat", "hnsw"]
Filters = Mapping[str, str | Sequence[str]]
ProgressCallback = Callable[[int, int], None]  # (done, total)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
METADATA_PREFIX = "metadata."
LOAD_ATTEMPTS = 5


class IndexConfig(BaseModel):
    """How the index is built and searched.

    The HNSW defaults (M 32, efConstruction 80, efSearch 128) are the usual starting point
    for real embeddings, which cluster (not yet measured on ours). ``ef_search`` trades query time for
    recall; a larger ``ef_construction`` builds a better graph once, and slows every add.
    Uniformly random dim-512 unit vectors are the worst case, where every item is about as
    far from a query as every other, and no setting gets recall@10 >= 0.95 for much less
    work than an exact scan. Measured on one core, M 32 / efConstruction 80: 20k vectors,
    recall 0.61 at efSearch 128 (0.9 ms), 0.96 at 512 (2.6 ms, 72% of the items compared);
    100k vectors, 0.23 at 128 (1.2 ms), 0.94 at 2048 (13.6 ms, 62% compared). M 64 /
    efConstruction 256 at 20k: 0.86 at 128, 0.97 at 256. ``bench/index.py --vectors``
    measures real embeddings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(ge=1, description="vector dimension")
    exact_below: int = Field(default=50_000, ge=0,
                             description="live items below this: exact IndexFlatIP; at or above: HNSW")
    hnsw_m: int = Field(default=32, ge=4, le=256, description="HNSW neighbours per node")
    ef_construction: int = Field(default=80, ge=8, description="HNSW candidate list size while building")
    ef_search: int = Field(default=128, ge=1, description="HNSW candidate list size while searching")
    overfetch: float = Field(default=2.0, ge=1.0,
                             description="HNSW with filters or tombstones: safety factor on the candidates fetched")
    filter_exact_below: int = Field(default=20_000, ge=0,
                                    description="HNSW: a filter allowing fewer live items is answered exactly over them")
    max_fetch: int = Field(default=512, ge=1,
                           description="HNSW: a search needing more candidates than this (and than k) is answered "
                                       "exactly over the allowed items")


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float  # cosine similarity
    metadata: dict[str, str]


class IndexInputError(ValueError):
    """Invalid input to the vector index; ``field`` names what was wrong. The index is unchanged."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# -- input checks (pure) --------------------------------------------------------------------

def checked_ids(ids: Sequence[str], field: str = "ids", unique: bool = True) -> list[str]:
    """``ids`` as a list of non-empty strings; with ``unique``, no id twice."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence | np.ndarray):
        raise IndexInputError(field, f"expected a sequence of id strings, got {type(ids).__name__}")
    checked = list(ids)
    for position, item_id in enumerate(checked):
        if not isinstance(item_id, str):
            raise IndexInputError(f"{field}[{position}]", f"expected a string, got {type(item_id).__name__}")
        if not item_id.strip():
            raise IndexInputError(f"{field}[{position}]", "empty id")
    if unique and len(set(checked)) != len(checked):
        duplicate = next(item_id for item_id, count in Counter(checked).items() if count > 1)
        raise IndexInputError(field, f"id {duplicate!r} appears more than once")
    return checked


def normalised_matrix(vectors: Any, dim: int, field: str, rows: int | None = None,
                      allow_single: bool = False) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (n, dim) matrix of unit rows.

    ``rows``: the number of rows required; ``allow_single``: a 1-D vector is one row.
    """
    try:
        matrix = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise IndexInputError(field, f"not a numeric array ({exc})") from None
    if allow_single and matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise IndexInputError(field, f"expected shape ({rows if rows is not None else 'n'}, {dim}), got {matrix.shape}")
    if rows is not None and matrix.shape[0] != rows:
        raise IndexInputError(field, f"expected {rows} rows (one per id), got {matrix.shape[0]}")
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise IndexInputError(field, f"non-finite values (NaN or inf) in row {int(np.argmin(finite))}")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if matrix.shape[0] and not (norms > 0).all():
        raise IndexInputError(field, f"zero vector in row {int(np.argmin(norms[:, 0] > 0))} (it has no direction)")
    return np.ascontiguousarray(matrix / np.where(norms > 0, norms, 1), dtype=np.float32)


def checked_metadata(metadata: Sequence[Mapping[str, str]] | None, rows: int) -> list[dict[str, str]]:
    """One ``str → str`` dict per row (empty dicts when ``metadata`` is None)."""
    if metadata is None:
        return [{} for _ in range(rows)]
    if isinstance(metadata, (str, bytes, Mapping)) or not isinstance(metadata, Sequence):
        raise IndexInputError("metadata", f"expected a sequence of dicts (one per id), got {type(metadata).__name__}")
    if len(metadata) != rows:
        raise IndexInputError("metadata", f"expected {rows} entries (one per id), got {len(metadata)}")
    checked = []
    for position, entry in enumerate(metadata):
        if not isinstance(entry, Mapping):
            raise IndexInputError(f"metadata[{position}]", f"expected a dict, got {type(entry).__name__}")
        for key, value in entry.items():
            if not isinstance(key, str) or not key:
                raise IndexInputError(f"metadata[{position}]", f"field names must be non-empty strings, got {key!r}")
            if not isinstance(value, str):
                raise IndexInputError(f"metadata[{position}].{key}", f"expected a string, got {type(value).__name__}")
        checked.append(dict(entry))
    return checked


def checked_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise IndexInputError("k", f"expected an integer >= 1, got {k!r}")
    return int(k)


def checked_filters(filters: Filters | None) -> dict[str, tuple[str, ...]] | None:
    """Each field → the tuple of values it may take (None: no filter)."""
    if filters is None:
        return None
    if not isinstance(filters, Mapping):
        raise IndexInputError("filters", f"expected a dict of field -> value or list of values, got {type(filters).__name__}")
    checked = {}
    for key, allowed in filters.items():
        if not isinstance(key, str) or not key:
            raise IndexInputError("filters", f"field names must be non-empty strings, got {key!r}")
        values = (allowed,) if isinstance(allowed, str) else allowed
        if not isinstance(values, Sequence | set | frozenset) or isinstance(values, bytes) or not values \
                or not all(isinstance(v, str) for v in values):
            raise IndexInputError(f"filters.{key}", f"expected a string or a non-empty list of strings, got {allowed!r}")
        checked[key] = tuple(values)
    return checked or None


# -- faiss helpers ------------------------------------------------------------------------------

def new_faiss_index(config: IndexConfig, kind: IndexKind) -> faiss.IndexIDMap2:
    """An empty index of ``kind`` that takes our int64 labels."""
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(config.dim))
    graph = faiss.IndexHNSWFlat(config.dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = config.ef_construction
    graph.hnsw.efSearch = config.ef_search
    return faiss.IndexIDMap2(graph)


def index_kind(index: faiss.IndexIDMap2) -> IndexKind:
    return "hnsw" if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW) else "flat"


def flat_storage(index: faiss.IndexIDMap2) -> faiss.IndexFlat:
    """The flat array of stored vectors: the index itself when flat, the graph's storage when HNSW."""
    inner = faiss.downcast_index(index.index)
    return faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner


def stored_vectors(index: faiss.IndexIDMap2) -> np.ndarray:
    """(ntotal, d) view of the stored vectors, in storage order; valid until the index changes."""
    storage = flat_storage(index)
    if storage.ntotal == 0:
        return np.zeros((0, storage.d), dtype=np.float32)
    return faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)


def stored_labels(index: faiss.IndexIDMap2) -> np.ndarray:
    """(ntotal,) view of our label at each storage position; valid until the index changes."""
    if index.ntotal == 0:
        return np.zeros(0, dtype=np.int64)
    return faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size())


def exact_search(index: faiss.IndexIDMap2, queries: np.ndarray, k: int,
                 allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, labels; label -1 where fewer exist) over the items whose label is
    True in ``allowed``: a flat scan of the stored vectors restricted by an id selector."""
    bits = np.packbits(allowed, bitorder="little")
    by_label = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    by_position = faiss.IDSelectorTranslated(index.id_map, by_label)
    scores, positions = flat_storage(index).search(queries, k, params=faiss.SearchParameters(sel=by_position))
    labels = stored_labels(index)[np.maximum(positions, 0)]
    return scores, np.where(positions >= 0, labels, -1)


def first_allowed(scores: np.ndarray, labels: np.ndarray, allowed: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the first ``k`` candidates whose label is allowed: (scores, labels with -1 for
    missing, how many were found)."""
    keep = labels >= 0
    keep[keep] = allowed[labels[keep]]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    picked = np.where(kept, np.take_along_axis(labels, order, axis=1), -1)
    return np.take_along_axis(scores, order, axis=1), picked, kept.sum(axis=1)


def overfetch_size(k: int, stored: int, allowed: int, factor: float) -> int:
    """Candidates to fetch so that ~``k`` of them are allowed when ``allowed`` of ``stored`` are."""
    if allowed >= stored:
        return min(k, stored)
    return min(stored, math.ceil(k * factor * stored / max(allowed, 1)))


# -- items: ids, liveness and metadata by label -------------------------------------------------

class ItemTable:
    """Item ids, liveness and metadata by faiss label; labels are dense ints handed out in order.

    Metadata is kept as one int32 code column per field (-1: absent), so a filter over a
    million items is a few vectorised comparisons.
    """

    def __init__(self) -> None:
        self.ids: list[str | None] = []          # label -> item id (None for labels never saved)
        self.label_of: dict[str, int] = {}       # live item id -> label
        self.alive = np.zeros(0, dtype=bool)     # label -> live?, over capacity
        self.values: dict[str, list[str]] = {}   # field -> code -> value
        self.codes: dict[str, dict[str, int]] = {}  # field -> value -> code
        self.columns: dict[str, np.ndarray] = {}    # field -> label -> code, over capacity

    @property
    def next_label(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.label_of)

    def _reserve(self, size: int) -> None:
        capacity = len(self.alive)
        if size <= capacity:
            return
        grown = max(size, 2 * capacity, 1024)
        self.alive = np.concatenate([self.alive, np.zeros(grown - capacity, dtype=bool)])
        for field, column in self.columns.items():
            self.columns[field] = np.concatenate([column, np.full(grown - capacity, -1, dtype=np.int32)])

    def _column(self, field: str) -> np.ndarray:
        if field not in self.columns:
            self.values[field], self.codes[field] = [], {}
            self.columns[field] = np.full(len(self.alive), -1, dtype=np.int32)
        return self.columns[field]

    def _code(self, field: str, value: str) -> int:
        codes = self.codes[field]
        if value not in codes:
            codes[value] = len(self.values[field])
            self.values[field].append(value)
        return codes[value]

    def append(self, ids: list[str], metadata: list[dict[str, str]]) -> np.ndarray:
        """Give each id (none of them live) a new label; return the labels."""
        labels = np.arange(self.next_label, self.next_label + len(ids), dtype=np.int64)
        self._reserve(self.next_label + len(ids))
        self.ids.extend(ids)
        for label, item_id, entry in zip(labels.tolist(), ids, metadata):
            self.label_of[item_id] = label
            for field, value in entry.items():
                column = self._column(field)
                column[label] = self._code(field, value)
        self.alive[labels] = True
        return labels

    def kill(self, labels: list[int]) -> None:
        for label in labels:
            del self.label_of[self.ids[label]]
        self.alive[labels] = False

    def metadata_of(self, label: int) -> dict[str, str]:
        return {field: self.values[field][code] for field, column in self.columns.items()
                if (code := int(column[label])) >= 0}

    def live_mask(self) -> np.ndarray:
        """label -> live? (a view over the labels handed out)."""
        return self.alive[:self.next_label]

    def allowed_mask(self, filters: dict[str, tuple[str, ...]] | None) -> np.ndarray:
        """label -> live and matching every field of ``filters``."""
        allowed = self.live_mask().copy()
        for field, values in (filters or {}).items():
            wanted = [self.codes.get(field, {}).get(value) for value in values]
            wanted = [code for code in wanted if code is not None]
            if not wanted:
                return np.zeros_like(allowed)
            allowed &= np.isin(self.columns[field][:self.next_label], wanted)
        return allowed

    def to_arrow(self) -> pa.Table:
        """The live items: label, id, and one dictionary-encoded string column per metadata field."""
        labels = np.flatnonzero(self.live_mask()).astype(np.int64)
        columns = {"label": pa.array(labels), "id": pa.array([self.ids[label] for label in labels.tolist()],
                                                              type=pa.string())}
        for field, column in self.columns.items():
            codes = column[labels]
            indices = pa.array(codes, mask=codes < 0, type=pa.int32())
            columns[METADATA_PREFIX + field] = pa.DictionaryArray.from_arrays(
                indices, pa.array(self.values[field], type=pa.string()))
        return pa.table(columns)

    @classmethod
    def from_arrow(cls, table: pa.Table, next_label: int) -> ItemTable:
        items = cls()
        labels = table.column("label").to_numpy().astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= next_label):
            raise ValueError(f"item labels outside 0..{next_label - 1}")
        items.ids = [None] * next_label
        for label, item_id in zip(labels.tolist(), table.column("id").to_pylist()):
            items.ids[label] = item_id
            items.label_of[item_id] = label
        items._reserve(next_label)
        items.alive[labels] = True
        for name in table.column_names:
            if not name.startswith(METADATA_PREFIX):
                continue
            field = name[len(METADATA_PREFIX):]
            encoded = pc.dictionary_encode(table.column(name).cast(pa.string()).combine_chunks())
            column = items._column(field)
            column[labels] = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            items.values[field] = encoded.dictionary.to_pylist()
            items.codes[field] = {value: code for code, value in enumerate(items.values[field])}
        return items


# -- the index ----------------------------------------------------------------------------------

class VectorIndex:
    """Vectors by item id, with metadata, exact or HNSW by size; see the module docstring."""

    def __init__(self, config: IndexConfig):
        self.config = config
        self._items = ItemTable()
        self._faiss = new_faiss_index(config, "flat")
        self._tombstones: set[int] = set()  # labels still in the HNSW graph, no longer live

    # -- state --------------------------------------------------------------------------------
    @property
    def kind(self) -> IndexKind:
        return index_kind(self._faiss)

    @property
    def tombstones(self) -> int:
        """Deleted or replaced vectors still in the HNSW graph (0 in the flat index)."""
        return len(self._tombstones)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items.label_of

    def metadata(self, item_id: str) -> dict[str, str]:
        """The metadata stored with a live item (KeyError when absent)."""
        return self._items.metadata_of(self._items.label_of[item_id])

    # -- writes -------------------------------------------------------------------------------
    def add(self, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, str]] | None = None) -> None:
        """Add or replace items: ``vectors`` (len(ids), dim) are normalised; ``metadata`` is one
        ``str → str`` dict per id. Crossing ``exact_below`` moves the index to HNSW here."""
        ids = checked_ids(ids)
        matrix = normalised_matrix(vectors, self.config.dim, "vectors", rows=len(ids))
        rows = checked_metadata(metadata, len(ids))
        if not ids:
            return
        self._forget([self._items.label_of[i] for i in ids if i in self._items.label_of])
        labels = self._items.append(ids, rows)
        if self.kind == "flat" and len(self._items) >= self.config.exact_below:
            self._faiss = self._rebuilt("hnsw")
        self._faiss.add_with_ids(matrix, labels)

    def add_with_near_duplicates(self, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, str]] | None,
                                 above: float) -> list[tuple[str, float] | None]:
        """``near_duplicates`` of the new items (against the index and earlier items of the batch), then ``add``:
        one call, so an index owner runs both under one lock."""
        matrix = normalised_matrix(vectors, self.config.dim, "vectors", rows=len(checked_ids(ids)))
        found = near_duplicates(self, list(ids), matrix, above)
        self.add(ids, matrix, metadata)
        return found

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items; return how many were live. Unknown ids are ignored, so a retried
        delete is harmless."""
        ids = checked_ids(ids, unique=False)
        labels = sorted({self._items.label_of[i] for i in ids if i in self._items.label_of})
        self._forget(labels)
        return len(labels)

    def compact(self) -> None:
        """Rebuild from the live vectors only: drops HNSW tombstones, and picks flat or HNSW by
        the live count again."""
        self._faiss = self._rebuilt("hnsw" if len(self) >= self.config.exact_below else "flat")

    def _forget(self, labels: list[int]) -> None:
        if not labels:
            return
        self._items.kill(labels)
        if self.kind == "flat":
            self._faiss.remove_ids(np.asarray(labels, dtype=np.int64))
        else:
            self._tombstones.update(labels)

    def _rebuilt(self, kind: IndexKind) -> faiss.IndexIDMap2:
        """A new ``kind`` index holding the live stored vectors under their labels."""
        labels = stored_labels(self._faiss)
        live = self._items.alive[labels]
        rebuilt = new_faiss_index(self.config, kind)
        rebuilt.add_with_ids(np.ascontiguousarray(stored_vectors(self._faiss)[live]), labels[live].copy())
        self._tombstones = set()
        return rebuilt

    # -- reads --------------------------------------------------------------------------------
    def search(self, query_vectors: Any, k: int = 10, filters: Filters | None = None) -> list[list[SearchHit]]:
        """The ``k`` most similar live items for each query (a (n, dim) matrix or one vector),
        best first; ``filters``: each field must equal the value or one of the listed values.
        Fewer than ``k`` hits only when fewer than ``k`` items match."""
        queries = normalised_matrix(query_vectors, self.config.dim, "query_vectors", allow_single=True)
        k = checked_k(k)
        wanted = checked_filters(filters)
        scores, labels = self._search_labels(queries, k, wanted)
        return [[SearchHit(id=self._items.ids[label], score=float(score), metadata=self._items.metadata_of(label))
                 for score, label in zip(row_scores.tolist(), row_labels.tolist()) if label >= 0]
                for row_scores, row_labels in zip(scores, labels)]

    def _search_labels(self, queries: np.ndarray, k: int,
                       filters: dict[str, tuple[str, ...]] | None) -> tuple[np.ndarray, np.ndarray]:
        if not len(self) or not len(queries):
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        if filters is None:
            allowed, allowed_count = (self._items.live_mask() if self._tombstones else None), len(self)
        else:
            allowed = self._items.allowed_mask(filters)
            allowed_count = int(np.count_nonzero(allowed))
        k = min(k, allowed_count)
        if k == 0:
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        if allowed is None:
            return self._faiss.search(queries, k)
        fetch = overfetch_size(k, self._faiss.ntotal, allowed_count, self.config.overfetch)
        if self.kind == "flat" or allowed_count < self.config.filter_exact_below \
                or fetch > max(self.config.max_fetch, k):
            return exact_search(self._faiss, queries, k, allowed)
        scores, labels, found = first_allowed(*self._faiss.search(queries, fetch), allowed, k)
        short = np.flatnonzero(found < k)
        if len(short):
            scores[short], labels[short] = exact_search(self._faiss, queries[short], k, allowed)
        return scores, labels

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the index into ``folder``, committed by one rename of ``manifest.json``; files
        of earlier saves are removed afterwards."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        faiss_file, items_file = f"index-{token}.faiss", f"items-{token}.parquet"
        _write_atomically(folder / faiss_file, lambda path: faiss.write_index(self._faiss, str(path)))
        _write_atomically(folder / items_file, lambda path: pq.write_table(self._items.to_arrow(), path))
        manifest = {"format": FORMAT_VERSION, "config": self.config.model_dump(), "kind": self.kind,
                    "count": len(self), "next_label": self._items.next_label,
                    "tombstones": sorted(self._tombstones), "faiss_file": faiss_file, "items_file": items_file}
        _write_atomically(folder / MANIFEST,
                          lambda path: path.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
        _fsync_directory(folder)
        for stale in folder.iterdir():
            if _is_stale_save_file(stale.name, current=(faiss_file, items_file)):
                stale.unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> VectorIndex:
        """The index last committed to ``folder`` by ``save``. A save that commits while this
        reads (and removes the files it was reading) makes it start again on the new manifest."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        for attempt in range(LOAD_ATTEMPTS):
            if not manifest_path.is_file():
                raise FileNotFoundError(f"{folder} holds no {MANIFEST}: not a saved vector index")
            manifest_text = manifest_path.read_text(encoding="utf-8")
            try:
                return cls._from_files(folder, json.loads(manifest_text))
            except (OSError, RuntimeError):  # faiss raises RuntimeError for a file that is gone
                superseded = manifest_path.is_file() and manifest_path.read_text(encoding="utf-8") != manifest_text
                if not superseded or attempt == LOAD_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _from_files(cls, folder: Path, manifest: dict[str, Any]) -> VectorIndex:
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}")
        index = cls(IndexConfig.model_validate(manifest["config"]))
        loaded = faiss.read_index(str(folder / manifest["faiss_file"]))
        if not isinstance(loaded, faiss.IndexIDMap2):
            raise ValueError(f"{folder / manifest['faiss_file']}: expected an IndexIDMap2, got {type(loaded).__name__}")
        index._faiss = loaded
        if index.kind == "hnsw":
            faiss.downcast_index(loaded.index).hnsw.efSearch = index.config.ef_search
        index._items = ItemTable.from_arrow(pq.read_table(folder / manifest["items_file"]), manifest["next_label"])
        index._tombstones = set(manifest["tombstones"])
        if loaded.d != index.config.dim or index.kind != manifest["kind"] or len(index) != manifest["count"] \
                or loaded.ntotal != len(index) + len(index._tombstones):
            raise ValueError(f"{folder}: the faiss index ({loaded.ntotal} vectors, dim {loaded.d}) does not match "
                             f"the manifest ({manifest['count']} items + {len(index._tombstones)} tombstones)")
        return index


def near_duplicates(index: VectorIndex, ids: Sequence[str], embeddings: np.ndarray,
                    above: float) -> list[tuple[str, float] | None]:
    """For each new item, its most similar item (indexed earlier, or earlier in this batch) when at least ``above``."""
    found: list[tuple[str, float] | None] = []
    hits = index.search(embeddings, k=2) if len(index) else [[] for _ in embeddings]
    for i, embedding in enumerate(embeddings):
        others = [hit for hit in hits[i] if hit.id != ids[i]]  # a redone item may be indexed already
        best = (others[0].id, others[0].score) if others else None
        if i:
            similarities = embeddings[:i] @ embedding
            j = int(np.argmax(similarities))
            if best is None or similarities[j] > best[1]:
                best = (ids[j], float(similarities[j]))
        found.append(best if best is not None and best[1] >= above else None)
    return found


def build_index(config: IndexConfig, ids: Sequence[str], vectors: Any,
                metadata: Sequence[Mapping[str, str]] | None = None, progress: ProgressCallback | None = None,
                batch_size: int = 50_000) -> VectorIndex:
    """A new index over ``ids``/``vectors``/``metadata``, added in batches, reporting progress."""
    ids = checked_ids(ids)
    matrix = normalised_matrix(vectors, config.dim, "vectors", rows=len(ids))
    rows = checked_metadata(metadata, len(ids))
    index = VectorIndex(config)
    for start in range(0, len(ids), batch_size):
        stop = min(start + batch_size, len(ids))
        index.add(ids[start:stop], matrix[start:stop], rows[start:stop])
        if progress:
            progress(stop, len(ids))
    return index


# -- files --------------------------------------------------------------------------------------

def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary name beside ``path``, flush it to disk, rename it into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _is_stale_save_file(name: str, current: tuple[str, ...]) -> bool:
    """A file an earlier (or crashed) save left behind: not ``current``, not the manifest."""
    ours = name.startswith(("index-", "items-")) or (name.startswith(".") and name.endswith(".tmp"))
    return ours and name not in (MANIFEST, *current)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
