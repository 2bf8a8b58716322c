"""Search the vector index by text or by image: ``genshop search``.

A text query and an image query go through the same CLIP as the indexed items, so
text→image and image→image search share one index. Queries are checked before anything
runs: an empty text, an image file of 0 bytes, one that does not decode (a PNG text or ICC
chunk that inflates past Pillow's ``MAX_TEXT_CHUNK`` included), or one larger than
``MAX_QUERY_PIXELS`` is a ``QueryError`` naming the field; the index is only read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from genshop.embedding import Embedder
from genshop.understanding.index import Filters, SearchHit, VectorIndex

MAX_QUERY_PIXELS = 40_000_000  # 20k x 20k is 400M: refused before decoding
MAX_QUERY_CHARS = 1000


class QueryError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def load_query_image(path: str | Path) -> Image.Image:
    """The query image, refused if empty, not an image, or too large to decode safely."""
    path = Path(path)
    if not path.is_file():
        raise QueryError("image", f"{path} is not a file")
    if path.stat().st_size == 0:
        raise QueryError("image", f"{path} is empty (0 bytes)")
    try:
        with Image.open(path) as probe:  # reads the header only
            width, height = probe.size
            if width * height > MAX_QUERY_PIXELS:
                raise QueryError("image", f"{path} is too large ({width}x{height} pixels; at most "
                                          f"{MAX_QUERY_PIXELS:,} are accepted)")
            probe.load()
            return probe.convert("RGB")
    except Image.DecompressionBombError as exc:  # PIL's own refusal, far above our limit
        raise QueryError("image", f"{path} is too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        # ValueError: Pillow's refusal of a text or ICC chunk that inflates past PngImagePlugin.MAX_TEXT_CHUNK
        raise QueryError("image", f"{path} is not a readable image ({exc})") from exc


def checked_text(text: str) -> str:
    """A text query as it is embedded (stripped), refused when empty or too long."""
    if not text.strip():
        raise QueryError("query", "is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError("query", f"is {len(text)} characters; at most {MAX_QUERY_CHARS}")
    return text.strip()


class TextVectorCache:
    """Text-query embeddings of one embedder, the most recently used ``size`` kept (a shop's
    queries repeat: "red kurta" is embedded once, not once per request). Thread-safe."""

    def __init__(self, embedder: Embedder, size: int = 4096):
        self.embedder, self.size = embedder, size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` unit vectors of checked texts; the ones not cached embedded in one call."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            embedded = self.embedder.embed_texts(missing)
            with self._lock:
                self._vectors.update(zip(missing, embedded))
        with self._lock:
            rows = []
            for text in texts:
                vector = self._vectors.get(text)
                if vector is None:  # evicted meanwhile by a burst of other queries
                    vector = self.embedder.embed_texts([text])[0]
                self._vectors[text] = vector
                self._vectors.move_to_end(text)
                rows.append(vector)
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)
        return np.stack(rows)


def search_texts(index: VectorIndex, cache: TextVectorCache, texts: Sequence[str], k: int,
                 filters: Filters | None = None) -> list[list[SearchHit]]:
    """Several text queries at once: their vectors (cached, the rest in one CLIP forward) and one index
    search of each distinct text (a shop's concurrent queries repeat: each is scanned once)."""
    if k < 1:
        raise QueryError("k", "must be at least 1")
    checked = [checked_text(t) for t in texts]
    distinct = list(dict.fromkeys(checked))
    hits = dict(zip(distinct, index.search(cache.vectors(distinct), k=k, filters=filters)))
    return [list(hits[text]) for text in checked]


def query_vector(embedder: Embedder, text: str | None = None, image: str | Path | None = None) -> np.ndarray:
    """One unit vector: the text's, the image's, or (both given) their normalised sum."""
    if text is not None:
        text = checked_text(text)
    if text is None and image is None:
        raise QueryError("query", "give a text query, an image, or both")
    parts = []
    if image is not None:
        parts.append(embedder.embed_images([load_query_image(image)])[0])
    if text is not None:
        parts.append(embedder.embed_texts([text])[0])
    vector = np.sum(parts, axis=0)
    return vector / np.linalg.norm(vector)


def search(index: VectorIndex, embedder: Embedder, text: str | None = None, image: str | Path | None = None,
           k: int = 10, filters: Filters | None = None) -> list[SearchHit]:
    if k < 1:
        raise QueryError("k", "must be at least 1")
    return index.search(query_vector(embedder, text, image), k=k, filters=filters)[0]
