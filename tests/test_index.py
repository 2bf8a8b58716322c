"""The vector index: real faiss, real files. Exact answers against numpy brute force, HNSW
against the exact index, writes, filters, persistence and input checks."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from genshop.understanding import index as index_module
from genshop.understanding.index import IndexConfig, IndexInputError, VectorIndex, build_index

DIM = 32
COLOURS = ["Red", "Blue", "Green", "Black"]


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_vectors(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def item_ids(count: int, start: int = 0) -> list[str]:
    return [f"00000000-0000-4000-8000-{n:012d}" for n in range(start, start + count)]


def item_metadata(count: int, start: int = 0) -> list[dict[str, str]]:
    return [{"colour": COLOURS[n % 4], "kind": "generated" if n % 25 == 0 else "catalog",
             "gender": "Women" if n % 2 else "Men"} for n in range(start, start + count)]


def filled_index(count: int, exact_below: int = 50_000, dim: int = DIM, **config) -> tuple[VectorIndex, np.ndarray]:
    vectors = unit_vectors(count, dim)
    index = VectorIndex(IndexConfig(dim=dim, exact_below=exact_below, **config))
    index.add(item_ids(count), vectors, item_metadata(count))
    return index, vectors


def brute_force(vectors: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order], np.take_along_axis(scores, order, axis=1)


def hit_ids(results) -> list[list[str]]:
    return [[hit.id for hit in row] for row in results]


def snapshot(index: VectorIndex, queries: np.ndarray) -> tuple:
    """Everything a caller can see: size, kind, tombstones, and full search results."""
    return len(index), index.kind, index.tombstones, index.search(queries, 10), \
        index.search(queries, 5, filters={"colour": "Red"})


# -- exact search ------------------------------------------------------------------------------

def test_exact_top_k_equals_numpy_brute_force():
    index, vectors = filled_index(1000)
    queries = unit_vectors(25, seed=1)
    results = index.search(queries, 10)
    expected_ids, expected_scores = brute_force(vectors, item_ids(1000), queries, 10)
    assert index.kind == "flat"
    assert hit_ids(results) == expected_ids
    np.testing.assert_allclose([[hit.score for hit in row] for row in results], expected_scores, atol=1e-5)
    assert results[0][0].metadata == item_metadata(1000)[int(np.argmax(vectors @ queries[0]))]


def test_vectors_are_normalised_so_scores_are_cosines():
    index, vectors = filled_index(200)
    hits = index.search(vectors[7] * 13.0, 1)  # one 1-D query, not unit length
    assert hit_ids(hits) == [[item_ids(200)[7]]]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_the_index_returns_every_item():
    index, _ = filled_index(7)
    assert len(index.search(unit_vectors(1, seed=3), 50)[0]) == 7
    assert VectorIndex(IndexConfig(dim=DIM)).search(unit_vectors(2), 5) == [[], []]


# -- writes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("exact_below", [50_000, 0], ids=["flat", "hnsw"])
def test_add_delete_and_re_add(exact_below):
    index, vectors = filled_index(600, exact_below=exact_below)
    ids = item_ids(600)
    assert index.kind == ("flat" if exact_below else "hnsw")

    assert index.delete(ids[:3] + ["no-such-id", ids[0]]) == 3
    assert len(index) == 597 and ids[0] not in index and ids[3] in index
    assert index.delete(ids[:3]) == 0  # a retried delete is harmless
    found = hit_ids(index.search(vectors[:3], 10))
    assert all(set(row).isdisjoint(ids[:3]) for row in found)

    moved = unit_vectors(1, seed=99)
    index.add([ids[10]], moved, [{"colour": "Pink"}])  # replace: new vector, new metadata
    assert len(index) == 597
    assert index.metadata(ids[10]) == {"colour": "Pink"}
    best = index.search(moved, 1)[0][0]
    assert best.id == ids[10] and best.score == pytest.approx(1.0, abs=1e-5)
    assert all(hit.id != ids[10] or hit.score < 0.99 for hit in index.search(vectors[10], 10)[0])
    assert [h.id for h in index.search(moved, 600)[0]].count(ids[10]) == 1  # the old vector is gone or tombstoned

    index.add(ids[:3], vectors[:3], item_metadata(3))  # deleted ids come back
    assert len(index) == 600 and hit_ids(index.search(vectors[0], 1)) == [[ids[0]]]
    assert index.tombstones == (0 if exact_below else 4)

    index.compact()
    assert index.tombstones == 0 and len(index) == 600 and index.kind == ("flat" if exact_below else "hnsw")
    assert hit_ids(index.search(vectors[5], 1)) == [[ids[5]]]


def test_hnsw_stays_after_deletes_until_compact_picks_the_kind_again():
    index, vectors = filled_index(600, exact_below=500)
    assert index.kind == "hnsw"
    index.delete(item_ids(200))
    assert index.kind == "hnsw" and index.tombstones == 200
    index.compact()
    assert index.kind == "flat" and index.tombstones == 0 and len(index) == 400
    assert hit_ids(index.search(vectors[300], 1)) == [[item_ids(1, start=300)[0]]]


def test_crossing_exact_below_switches_to_hnsw_with_high_recall():
    dim, count = 64, 3000
    vectors = unit_vectors(count, dim)
    ids = item_ids(count)
    index = VectorIndex(IndexConfig(dim=dim, exact_below=500))
    kinds = []
    for start in range(0, count, 250):
        index.add(ids[start:start + 250], vectors[start:start + 250], item_metadata(250, start))
        kinds.append(index.kind)
    assert kinds[:1] == ["flat"] and kinds[1:] == ["hnsw"] * (len(kinds) - 1)  # 500 live items: HNSW
    assert len(index) == count

    queries = unit_vectors(200, dim, seed=5)
    expected, _ = brute_force(vectors, ids, queries, 10)
    found = hit_ids(index.search(queries, 10))
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, expected)])
    assert recall >= 0.95


def test_build_index_reports_progress():
    calls = []
    index = build_index(IndexConfig(dim=DIM, exact_below=100), item_ids(250), unit_vectors(250),
                        item_metadata(250), progress=lambda done, total: calls.append((done, total)), batch_size=100)
    assert calls == [(100, 250), (200, 250), (250, 250)]
    assert len(index) == 250 and index.kind == "hnsw"


# -- filters -----------------------------------------------------------------------------------

def test_filters_on_the_exact_index_equal_brute_force_over_the_subset():
    index, vectors = filled_index(1000)
    ids, metadata = item_ids(1000), item_metadata(1000)
    queries = unit_vectors(10, seed=2)
    wanted = [n for n, m in enumerate(metadata) if m["colour"] in ("Red", "Blue") and m["gender"] == "Women"]
    expected, _ = brute_force(vectors[wanted], [ids[n] for n in wanted], queries, 10)
    results = index.search(queries, 10, filters={"colour": ["Red", "Blue"], "gender": "Women"})
    assert hit_ids(results) == expected
    assert all(h.metadata["colour"] in ("Red", "Blue") and h.metadata["gender"] == "Women"
               for row in results for h in row)


@pytest.mark.parametrize("search_config", [
    {"filter_exact_below": 20_000},  # few matches: exact over them
    {"filter_exact_below": 0},  # over-fetch, exact only past max_fetch
    {"filter_exact_below": 0, "overfetch": 1.0, "max_fetch": 10**6},  # bare over-fetch: short rows go exact
], ids=["exact-subset", "overfetch", "short-rows"])
def test_filters_on_hnsw_return_only_matches_and_still_k(search_config, monkeypatch):
    exact_rows = []
    exact_search = index_module.exact_search
    monkeypatch.setattr(index_module, "exact_search",
                        lambda index, queries, *rest: exact_rows.append(len(queries)) or exact_search(index, queries, *rest))
    index, vectors = filled_index(2000, exact_below=0, **search_config)
    ids, metadata = item_ids(2000), item_metadata(2000)
    index.delete(ids[:400:2])  # tombstones among the candidates
    queries = unit_vectors(20, seed=4)
    for filters in ({"colour": "Red"}, {"kind": "generated"}, {"kind": ["generated"], "colour": "Green"}, None):
        matching = [n for n, m in enumerate(metadata) if ids[n] in index
                    and all(m.get(f) in ((v,) if isinstance(v, str) else v) for f, v in (filters or {}).items())]
        results = index.search(queries, 10, filters=filters)
        assert all(len(row) == min(10, len(matching)) for row in results), filters
        allowed = {ids[n] for n in matching}
        assert all(hit.id in allowed for row in results for hit in row), filters
        assert all(row[i].score >= row[i + 1].score for row in results for i in range(len(row) - 1))
    if search_config["filter_exact_below"]:
        assert exact_rows == [20] * 4  # every search exact over the allowed items
    elif "overfetch" in search_config:
        assert exact_rows and all(0 < rows < 20 for rows in exact_rows)  # only the rows that came up short
    else:
        assert 0 < len(exact_rows) < 4


def test_selective_filter_with_fewer_than_k_matches_returns_them_all():
    index, vectors = filled_index(2000, exact_below=0)
    index.add(["special-1", "special-2"], unit_vectors(2, seed=8), [{"colour": "Gold"}, {"colour": "Gold"}])
    assert sorted(hit_ids(index.search(vectors[0], 10, filters={"colour": "Gold"}))[0]) == ["special-1", "special-2"]
    assert index.search(vectors[0], 10, filters={"colour": "Plaid"}) == [[]]
    assert index.search(vectors[0], 10, filters={"material": "Silk"}) == [[]]


# -- persistence -------------------------------------------------------------------------------

@pytest.mark.parametrize("exact_below", [50_000, 0], ids=["flat", "hnsw"])
def test_save_load_round_trip_gives_identical_results(tmp_path, exact_below):
    index, _ = filled_index(800, exact_below=exact_below)
    index.delete(item_ids(20))
    index.add(item_ids(5, start=100), unit_vectors(5, seed=7), [{"colour": "Pink"}] * 5)
    queries = unit_vectors(15, seed=6)

    loaded = VectorIndex.load(index.save(tmp_path / "index"))
    assert loaded.config == index.config
    assert snapshot(loaded, queries) == snapshot(index, queries)
    assert loaded.metadata(item_ids(1, start=100)[0]) == {"colour": "Pink"}

    loaded.add(["after-load"], unit_vectors(1, seed=11))  # labels keep counting after a load
    assert hit_ids(loaded.search(unit_vectors(1, seed=11), 1)) == [["after-load"]]


def test_a_crash_mid_save_leaves_the_old_index_loadable(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    index, _ = filled_index(300)
    queries = unit_vectors(5, seed=9)
    before = snapshot(index, queries)
    index.save(folder)

    index.add(item_ids(50, start=300), unit_vectors(50, seed=10), item_metadata(50, start=300))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module.pq, "write_table", crash)  # after the faiss file, before the manifest
    with pytest.raises(OSError):
        index.save(folder)
    monkeypatch.undo()
    assert snapshot(VectorIndex.load(folder), queries) == before

    index.save(folder)  # a later save commits and clears what the crashed one left
    assert snapshot(VectorIndex.load(folder), queries) == snapshot(index, queries)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", manifest["faiss_file"],
                                                               manifest["items_file"]])


def test_load_starts_again_when_a_save_commits_under_it(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    old, _ = filled_index(100)
    old.save(folder)
    new, _ = filled_index(150)
    read_index = index_module.faiss.read_index
    saves = []

    def save_then_read(path):  # the reader has the old manifest; a writer commits and removes its files
        if not saves:
            saves.append(new.save(folder))
        return read_index(path)

    monkeypatch.setattr(index_module.faiss, "read_index", save_then_read)
    assert len(VectorIndex.load(folder)) == 150


def test_load_of_a_folder_without_an_index_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        VectorIndex.load(tmp_path)


# -- input checks ------------------------------------------------------------------------------

def nan_vector() -> np.ndarray:
    vector = unit_vectors(1, seed=12)
    vector[0, 3] = np.nan
    return vector


BAD_ADDS = {
    "wrong dim": (["a"], unit_vectors(1, dim=DIM + 1), None, "vectors"),
    "rows do not match ids": (["a", "b"], unit_vectors(3), None, "vectors"),
    "NaN": (["a"], nan_vector(), None, "vectors"),
    "inf": (["a"], np.full((1, DIM), np.inf, dtype=np.float32), None, "vectors"),
    "zero vector": (["a"], np.zeros((1, DIM), dtype=np.float32), None, "vectors"),
    "empty id": (["a", " "], unit_vectors(2), None, "ids[1]"),
    "non-string id": ([7], unit_vectors(1), None, "ids[0]"),
    "one string, not a list": ("abc", unit_vectors(3), None, "ids"),
    "duplicate ids in one add": (["a", "b", "a"], unit_vectors(3), None, "ids"),
    "metadata length": (["a", "b"], unit_vectors(2), [{}], "metadata"),
    "metadata value not a string": (["a"], unit_vectors(1), [{"colour": 3}], "metadata[0].colour"),
}


@pytest.mark.parametrize("exact_below", [50_000, 0], ids=["flat", "hnsw"])
@pytest.mark.parametrize("case", list(BAD_ADDS), ids=list(BAD_ADDS))
def test_bad_add_raises_naming_the_field_and_changes_nothing(case, exact_below):
    index, _ = filled_index(100, exact_below=exact_below)
    ids, vectors, metadata, field = BAD_ADDS[case]
    ids = [item_ids(1)[0] if i == "a" else i for i in ids] if isinstance(ids, list) else ids  # "a" is live
    queries = unit_vectors(4, seed=13)
    before = snapshot(index, queries)
    with pytest.raises(IndexInputError) as raised:
        index.add(ids, vectors, metadata)
    assert raised.value.field == field and str(raised.value).startswith(field)
    assert isinstance(raised.value, ValueError)
    assert snapshot(index, queries) == before


BAD_SEARCHES = {
    "k = 0": ({"k": 0}, "k"),
    "k is a bool": ({"k": True}, "k"),
    "k is a float": ({"k": 2.0}, "k"),
    "query dim": ({"query_vectors": unit_vectors(2, dim=DIM - 1)}, "query_vectors"),
    "query NaN": ({"query_vectors": nan_vector()}, "query_vectors"),
    "filter empty list": ({"filters": {"colour": []}}, "filters.colour"),
    "filter value not a string": ({"filters": {"colour": 3}}, "filters.colour"),
    "filters not a dict": ({"filters": ["colour"]}, "filters"),
}


@pytest.mark.parametrize("case", list(BAD_SEARCHES), ids=list(BAD_SEARCHES))
def test_bad_search_raises_naming_the_field(case):
    index, _ = filled_index(50)
    arguments, field = BAD_SEARCHES[case]
    with pytest.raises(IndexInputError) as raised:
        index.search(**{"query_vectors": unit_vectors(1), "k": 5, **arguments})
    assert raised.value.field == field


def test_bad_delete_raises_and_changes_nothing():
    index, _ = filled_index(50)
    with pytest.raises(IndexInputError) as raised:
        index.delete([item_ids(1)[0], ""])
    assert raised.value.field == "ids[1]" and len(index) == 50 and item_ids(1)[0] in index


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        IndexConfig(dim=0)
    with pytest.raises(ValueError):
        IndexConfig(dim=8, exact_below=-1)
    with pytest.raises(ValueError):
        IndexConfig(dim=8, shards=2)
