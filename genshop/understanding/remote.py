"""One index for every machine: ``genshop index serve`` owns the faiss indexes, ``RemoteIndex`` asks it.

A deployment of several machines sets ``GENSHOP_INDEX_URL=http://host:port`` on every process
(workers, the API, ``catalog import``); the index owner is the only process that holds the
faiss indexes (``VectorIndex``) and the only one that writes ``GENSHOP_INDEX_DIR`` (its own
disk). Without the URL, every process opens the folder itself (the embedded default).

Why one owner process over HTTP, not a vector database or a Celery queue: it needs no new
server (FastAPI and uvicorn are already here), the filters, tombstones, flat→HNSW move and
crash-safe saves of ``VectorIndex`` stay exactly as tested, a search is answered from memory
(no load of the whole index per request), and writes are serialised by one lock in one
process instead of a file lock that only works on one filesystem. A write is saved (the
manifest rename) before it is answered, so an item recorded as understood is always in the
saved index. Near-duplicate checks run on the owner under the same lock as the add
(``add_with_near_duplicates``), so two workers enriching at once still see each other's items.

The wire format is JSON with vectors as base64 float32 (little-endian) and their shape.
``IndexInputError`` travels as 422 ``{"field", "message"}`` and is raised again by the client.
Indexes are named: ``main`` (``GENSHOP_INDEX_DIR``) and ``products`` (its ``products/`` folder).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from genshop.understanding.index import Filters, IndexConfig, IndexInputError, SearchHit, VectorIndex

INDEX_NAMES = {"main": "", "products": "products"}  # name → subfolder of the index folder


def encode_vectors(vectors: Any) -> dict[str, Any]:
    matrix = np.ascontiguousarray(np.asarray(vectors, dtype="<f4"))
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    return {"shape": list(matrix.shape), "data": base64.b64encode(matrix.tobytes()).decode()}


def decode_vectors(payload: Mapping[str, Any], field: str) -> np.ndarray:
    try:
        shape = [int(n) for n in payload["shape"]]
        matrix = np.frombuffer(base64.b64decode(payload["data"]), dtype="<f4")
        return matrix.reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexInputError(field, f"expected {{shape, data: base64 float32}}, {exc}") from None


class Vectors(BaseModel):
    shape: list[int]
    data: str


class AddRequest(BaseModel):
    ids: list[Any]
    vectors: Vectors
    metadata: list[dict[str, Any]] | None = None
    near_duplicate_above: float | None = None


class DeleteRequest(BaseModel):
    ids: list[Any]


class SearchRequest(BaseModel):
    vectors: Vectors
    k: Any = 10
    filters: Any = None


class OwnedIndex:
    """One named index in memory, with its folder and the lock every request takes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = threading.Lock()
        self.index = VectorIndex.load(folder) if (folder / "manifest.json").is_file() else None


def create_index_app(index_dir: str | Path):
    """The index owner's FastAPI app over the indexes in ``index_dir``."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    root = Path(index_dir)
    app = FastAPI(title="GenShop index", docs_url=None, redoc_url=None)
    owned: dict[str, OwnedIndex] = {}
    opening = threading.Lock()

    def named(name: str) -> OwnedIndex:
        if name not in INDEX_NAMES:
            raise HTTPException(404, f"no index named {name!r} (known: {sorted(INDEX_NAMES)})")
        with opening:
            if name not in owned:
                owned[name] = OwnedIndex(root / INDEX_NAMES[name])
            return owned[name]

    @app.exception_handler(IndexInputError)
    def bad_input(_request: Request, exc: IndexInputError):
        return JSONResponse({"field": exc.field, "message": str(exc).partition(": ")[2]}, status_code=422)

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.get("/indexes/{name}")
    def describe(name: str):
        entry = named(name)
        with entry.lock:
            index = entry.index
            if index is None:
                return {"exists": False, "count": 0}
            return {"exists": True, "count": len(index), "kind": index.kind, "dim": index.config.dim,
                    "tombstones": index.tombstones}

    @app.get("/indexes/{name}/items/{item_id}")
    def item(name: str, item_id: str):
        entry = named(name)
        with entry.lock:
            if entry.index is None or item_id not in entry.index:
                raise HTTPException(404, f"no item {item_id!r}")
            return {"id": item_id, "metadata": entry.index.metadata(item_id)}

    @app.post("/indexes/{name}/add")
    def add(name: str, request: AddRequest):
        entry = named(name)
        vectors = decode_vectors(request.vectors.model_dump(), "vectors")
        with entry.lock:
            index = entry.index or VectorIndex(IndexConfig(dim=vectors.shape[1] if vectors.ndim == 2 else 1))
            duplicates = None
            if request.near_duplicate_above is not None:
                duplicates = index.add_with_near_duplicates(request.ids, vectors, request.metadata,
                                                            request.near_duplicate_above)
            else:
                index.add(request.ids, vectors, request.metadata)
            index.save(entry.folder)  # saved before answered: an acknowledged add survives a crash
            entry.index = index
            return {"count": len(index), "duplicates": duplicates}

    @app.post("/indexes/{name}/delete")
    def delete(name: str, request: DeleteRequest):
        entry = named(name)
        with entry.lock:
            if entry.index is None:
                return {"deleted": 0}
            deleted = entry.index.delete(request.ids)
            if deleted:
                entry.index.save(entry.folder)
            return {"deleted": deleted}

    @app.post("/indexes/{name}/search")
    def search(name: str, request: SearchRequest):
        entry = named(name)
        vectors = decode_vectors(request.vectors.model_dump(), "query_vectors")
        with entry.lock:
            if entry.index is None:
                return {"hits": [[] for _ in range(len(vectors))]}
            hits = entry.index.search(vectors, k=request.k, filters=request.filters)
        return {"hits": [[{"id": h.id, "score": h.score, "metadata": h.metadata} for h in row] for row in hits]}

    return app


class IndexServerError(RuntimeError):
    pass


class RemoteIndex:
    """The ``VectorIndex`` interface (add, delete, search, near-duplicates, len, in, metadata) on an index owner."""

    def __init__(self, url: str, name: str = "main", timeout: float = 60.0):
        import httpx

        if name not in INDEX_NAMES:
            raise ValueError(f"no index named {name!r}")
        self.url = url.rstrip("/")
        self.name = name
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> Any:
        response = self._http.request(method, f"/indexes/{self.name}{path}", **kwargs)
        if response.status_code == 422:
            body = response.json()
            if "field" in body:
                raise IndexInputError(body["field"], body["message"])
        if response.status_code == 404 and path.startswith("/items/"):
            raise KeyError(path.removeprefix("/items/"))
        if response.status_code >= 400:
            raise IndexServerError(f"index server {self.url}: {response.status_code} {response.text[:500]}")
        return response.json()

    def describe(self) -> dict[str, Any]:
        return self._call("GET", "")

    def exists(self) -> bool:
        return bool(self.describe()["exists"])

    def __len__(self) -> int:
        return int(self.describe()["count"])

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, str) or not item_id:
            return False
        try:
            self.metadata(item_id)
            return True
        except KeyError:
            return False

    def metadata(self, item_id: str) -> dict[str, str]:
        from urllib.parse import quote

        return self._call("GET", f"/items/{quote(item_id, safe='')}")["metadata"]

    def add(self, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, str]] | None = None) -> None:
        self._add(ids, vectors, metadata, None)

    def add_with_near_duplicates(self, ids: Sequence[str], vectors: Any, metadata: Sequence[Mapping[str, str]] | None,
                                 above: float) -> list[tuple[str, float] | None]:
        found = self._add(ids, vectors, metadata, above)
        return [tuple(d) if d else None for d in found]

    def _add(self, ids, vectors, metadata, above) -> Any:
        body = {"ids": list(ids), "vectors": encode_vectors(vectors),
                "metadata": [dict(m) for m in metadata] if metadata is not None else None,
                "near_duplicate_above": above}
        return self._call("POST", "/add", json=body)["duplicates"]

    def delete(self, ids: Sequence[str]) -> int:
        return int(self._call("POST", "/delete", json={"ids": list(ids)})["deleted"])

    def search(self, query_vectors: Any, k: int = 10, filters: Filters | None = None) -> list[list[SearchHit]]:
        filters = {key: (list(v) if not isinstance(v, str) else v) for key, v in filters.items()} \
            if isinstance(filters, Mapping) else filters
        rows = self._call("POST", "/search", json={"vectors": encode_vectors(query_vectors), "k": k,
                                                   "filters": filters})["hits"]
        return [[SearchHit(id=h["id"], score=float(h["score"]), metadata=h["metadata"]) for h in row] for row in rows]

    def close(self) -> None:
        self._http.close()
