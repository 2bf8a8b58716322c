"""The enrich stage: every item (generated or imported from the catalog) embedded, categorized,
attribute-tagged, titled, checked for near-duplicates, indexed and stored.

One code path for the ``enrich`` Celery task, the in-process worker and ``genshop catalog
import``: ``enrich_items(store, enricher, items)``. Order makes it safe to redo after a
crash: items already understood with this embedding model are skipped; the vector index
is written (add replaces an id) before the understandings are stored, so an item is never
recorded as understood without being searchable.

With a product-vector model in the understanding folder, the fused image + title +
attributes vector of each item goes into a second index (``products/``), the one
``genshop search --category`` asks.

Where the index lives: by default one folder (``GENSHOP_INDEX_DIR``) shared by every worker
of one machine: each write holds an exclusive file lock for load → near-duplicate search →
add → save, so concurrent enrich tasks serialise there and nothing is lost (every write
loads and saves the whole index). With ``GENSHOP_INDEX_URL`` (several machines), the index
owner (``genshop index serve``, ``understanding.remote``) holds it in memory and does the
near-duplicate search and the add under its own lock; callers do not know which.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from genshop.embedding import Embedder, EmbeddingConfig, embedder_fingerprint, load_embedder
from genshop.store import ItemKind, NewCatalogProduct, NewUnderstanding, Store, UnderstandingRecord, catalog_product_id
from genshop.understanding.categorize import HIERARCHY, ItemUnderstanding, LinearHeads, ZeroShotClassifier, understand
from genshop.understanding.fitting import DEFAULT_TAXONOMY, load_zero_shot_temperatures
from genshop.understanding.fusion import FUSION_CONFIG, ProductFusion, modality_embeddings
from genshop.understanding.index import IndexConfig, VectorIndex, near_duplicates  # noqa: F401 - re-exported
from genshop.understanding.taxonomy import LEVELS, UNKNOWN_VALUES, Taxonomy, load_taxonomy

ProgressCallback = Callable[[int, int], None]
LOCK_FILE = ".lock"
PRODUCT_INDEX = "products"  # subfolder: the index of multimodal product vectors (category → product search)
PRODUCT_NAME = "products"  # its name on an index owner (`genshop index serve`); the image index is "main"


class EnrichConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding: EmbeddingConfig
    index_dir: Path
    index_url: str | None = Field(default=None, description="http://host:port of `genshop index serve` (the one "
                                                            "index of a deployment); None: the folder index_dir")
    taxonomy: Path = DEFAULT_TAXONOMY
    understanding: Path | None = Field(default=None, description="folder from `genshop understand fit`: calibration "
                                                                "temperatures and the top-tuned heads")
    classifier: Literal["zero-shot", "top-tuned"] = "zero-shot"
    abstain_below: float = Field(default=0.5, ge=0, le=1)
    near_duplicate_above: float = Field(default=0.95, gt=0, le=1, description="cosine similarity that flags a near-duplicate")


@dataclass(frozen=True)
class Enricher:
    config: EnrichConfig
    embedder: Embedder
    classifier: ZeroShotClassifier | LinearHeads
    taxonomy: Taxonomy
    model_id: str  # recorded with every understanding: the embedding model and a fingerprint of its files
    fusion: ProductFusion | None = None  # the multimodal product vector, when the understanding folder has one


@dataclass(frozen=True)
class ItemToEnrich:
    id: str
    kind: ItemKind
    image_path: Path
    title: str = ""
    known: dict[str, str] | None = None  # the catalog's own labels, used as index metadata when given


def enrich_config_from_settings(settings) -> EnrichConfig:
    """The enrich stage a deployment configured (``GENSHOP_EMBEDDING_MODEL``, ``..._UNDERSTANDING_HEADS``, ``..._INDEX_DIR``)."""
    if settings.embedding_model is None:
        raise ValueError("GENSHOP_EMBEDDING_MODEL is 'off': there is no enrich stage")
    return EnrichConfig(embedding=EmbeddingConfig.for_directory(settings.embedding_model, device=settings.device),
                        index_dir=settings.index_dir, index_url=settings.index_url,
                        understanding=settings.understanding,
                        classifier=settings.classifier)


def load_classifier(config: EnrichConfig, embedder: Embedder, taxonomy: Taxonomy) -> ZeroShotClassifier | LinearHeads:
    """The config's classifier over this embedder's space: zero-shot, or the understanding folder's top-tuned heads."""
    if config.classifier == "top-tuned":
        if config.understanding is None:
            raise ValueError("classifier: 'top-tuned' needs an understanding folder (`genshop understand fit`)")
        return LinearHeads.from_pretrained(config.understanding, taxonomy)
    return ZeroShotClassifier(embedder, taxonomy, load_zero_shot_temperatures(config.understanding))


def load_enricher(config: EnrichConfig) -> Enricher:
    taxonomy = load_taxonomy(config.taxonomy)
    embedder = load_embedder(config.embedding)
    classifier = load_classifier(config, embedder, taxonomy)
    fusion = None
    if config.understanding is not None and (config.understanding / FUSION_CONFIG).is_file():
        fusion = ProductFusion.from_pretrained(config.understanding)
    return Enricher(config, embedder, classifier, taxonomy, f"{Path(config.embedding.model).name}@{embedder_fingerprint(config.embedding)[:12]}", fusion)


def understand_images(enricher: Enricher, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[ItemUnderstanding]]:
    embeddings = enricher.embedder.embed_images(images)
    return embeddings, understand_embeddings(enricher, embeddings)


def understand_embeddings(enricher: Enricher, embeddings: np.ndarray,
                          classifier: ZeroShotClassifier | LinearHeads | None = None) -> list[ItemUnderstanding]:
    """What ``classifier`` (default: the enricher's own) reads in images already embedded by the enricher."""
    classifier = classifier or enricher.classifier
    temperature = classifier.temperatures.get(HIERARCHY, 1.0)
    return understand(classifier.log_posteriors(embeddings), enricher.taxonomy, enricher.config.abstain_below, temperature)


@contextmanager
def locked_index(folder: Path, dim: int) -> Iterator[VectorIndex]:
    """The index in ``folder`` (a new one if none), held under an exclusive lock, saved on success."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            index = VectorIndex.load(folder) if (folder / "manifest.json").is_file() else VectorIndex(IndexConfig(dim=dim))
            yield index
            index.save(folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_index(folder: Path) -> VectorIndex | None:
    """The saved index for reading (a consistent snapshot: saves commit by one rename), None if none."""
    return VectorIndex.load(folder) if (Path(folder) / "manifest.json").is_file() else None


@contextmanager
def writable_index(index_dir: Path, index_url: str | None, name: str, dim: int) -> Iterator:
    """The index ``name`` (``main`` or ``products``) to write: with ``index_url``, the index owner's
    (``RemoteIndex``: each call is one locked write there); without, the folder's under its file lock."""
    if index_url:
        from genshop.understanding.remote import RemoteIndex

        remote = RemoteIndex(index_url, name)
        try:
            yield remote
        finally:
            remote.close()
    else:
        with locked_index(index_dir / PRODUCT_INDEX if name == PRODUCT_NAME else index_dir, dim) as index:
            yield index


def readable_index(index_dir: Path, index_url: str | None, name: str = "main"):
    """The index ``name`` to search (``RemoteIndex`` or a loaded ``VectorIndex``), None when there is none yet."""
    if index_url:
        from genshop.understanding.remote import RemoteIndex

        remote = RemoteIndex(index_url, name)
        return remote if remote.exists() else None
    return open_index(index_dir / PRODUCT_INDEX if name == PRODUCT_NAME else index_dir)


def index_metadata(item: ItemToEnrich, understood: ItemUnderstanding) -> dict[str, str]:
    predicted = {level: getattr(understood, level).label for level in LEVELS}
    predicted |= {name: score.label for name, score in understood.attributes.items()}
    labels = item.known if item.known is not None else {k: v for k, v in predicted.items() if v}
    return {**labels, "kind": item.kind, "title": item.title or understood.title, "image_path": str(item.image_path)}


def product_vectors(enricher: Enricher, embeddings: np.ndarray, metadata: Sequence[dict[str, str]]) -> np.ndarray:
    """The fused image + title + attributes vectors of the items (``fusion.ProductFusion``)."""
    families = [family.name for family in enricher.taxonomy.attributes]
    return enricher.fusion.fuse(modality_embeddings(enricher.embedder, embeddings, [m["title"] for m in metadata],
                                                    [{f: m.get(f, "") for f in families} for m in metadata]))


def enrich_items(store: Store, enricher: Enricher, items: Sequence[ItemToEnrich]) -> list[UnderstandingRecord]:
    """Understand, deduplicate, index and store the items not yet understood with this model."""
    done = {u.item_id for u in store.list_understandings([i.id for i in items], enricher.model_id)}
    todo = [item for item in items if item.id not in done]
    if todo:
        images = [Image.open(item.image_path).convert("RGB") for item in todo]
        embeddings, understood = understand_images(enricher, images)
        metadata = [index_metadata(item, u) for item, u in zip(todo, understood)]
        ids = [item.id for item in todo]
        config = enricher.config
        with writable_index(config.index_dir, config.index_url, "main", embeddings.shape[1]) as index:
            duplicates = index.add_with_near_duplicates(ids, embeddings, metadata, config.near_duplicate_above)
            if enricher.fusion is not None:  # under the image index's lock too (local): one writer for both
                vectors = product_vectors(enricher, embeddings, metadata)
                with writable_index(config.index_dir, config.index_url, PRODUCT_NAME, vectors.shape[1]) as products:
                    products.add(ids, vectors, metadata)
        store.add_understandings([
            NewUnderstanding(
                item_id=item.id, kind=item.kind, embedding_model=enricher.model_id,
                embedding=embedding.astype("<f4").tobytes(),
                categories={level: getattr(u, level).model_dump() for level in LEVELS},
                attributes={name: score.model_dump() for name, score in u.attributes.items()},
                title=u.title, near_duplicate_of=duplicate[0] if duplicate else None,
                near_duplicate_similarity=duplicate[1] if duplicate else None)
            for item, embedding, u, duplicate in zip(todo, embeddings, understood, duplicates)])
    return store.list_understandings([i.id for i in items], enricher.model_id)


def enrich_brief(store: Store, brief_id: str, enricher: Enricher) -> list[UnderstandingRecord]:
    return enrich_briefs(store, [brief_id], enricher)[brief_id]


def enrich_briefs(store: Store, brief_ids: Sequence[str], enricher: Enricher) -> dict[str, list[UnderstandingRecord]]:
    """``enrich_brief`` for several briefs at once: one ``enrich_items`` over all their items (one
    CLIP forward, one index write); returns each brief's understandings."""
    items = {brief_id: store.list_items(brief_id) for brief_id in dict.fromkeys(brief_ids)}
    understood = enrich_items(store, enricher, [
        ItemToEnrich(id=i.id, kind="generated", image_path=store.images.path(i.image_path), title="")
        for brief_items in items.values() for i in brief_items])
    by_item = {u.item_id: u for u in understood}
    return {brief_id: [by_item[i.id] for i in brief_items if i.id in by_item] for brief_id, brief_items in items.items()}


class CatalogImportReport(BaseModel):
    rows: int
    added: int = Field(description="products new to the store")
    enriched: int = Field(description="products embedded, categorized and indexed")


def import_catalog(store: Store, paths: Sequence[Path], enricher: Enricher | None, limit: int | None = None,
                   batch_size: int = 256, progress: ProgressCallback | None = None) -> CatalogImportReport:
    """Load catalog parquet rows (the fashion-products format) into the store, and enrich them when an enricher is given."""
    from genshop.catalog_data import TAXONOMY_COLUMNS, decode_image, read_catalog

    frame = read_catalog(paths)
    if limit is not None:
        frame = frame.iloc[:limit]
    added = enriched = 0
    for start in range(0, len(frame), batch_size):
        products, to_enrich = [], []
        for row in frame.iloc[start:start + batch_size].to_dict("records"):
            sha, relative = store.images.put(decode_image(row["image"]))
            attributes = {column: row[column] for column in TAXONOMY_COLUMNS}
            products.append(NewCatalogProduct(product_id=row["product_id"], title=row["title"], attributes=attributes,
                                              image_sha256=sha, image_path=relative))
            to_enrich.append(ItemToEnrich(id=catalog_product_id(row["product_id"]), kind="catalog",
                                          image_path=store.images.path(relative), title=row["title"],
                                          known={k: v for k, v in attributes.items() if v not in UNKNOWN_VALUES}))
        added += store.add_catalog_products(products)
        if enricher is not None:
            enriched += len(enrich_items(store, enricher, to_enrich))
        if progress:
            progress(min(start + batch_size, len(frame)), len(frame))
    return CatalogImportReport(rows=len(frame), added=added, enriched=enriched)
