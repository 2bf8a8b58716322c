"""The index owner (``genshop index serve``'s app) and ``RemoteIndex``: the VectorIndex interface over HTTP."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from genshop.understanding.index import IndexInputError, VectorIndex, IndexConfig
from genshop.understanding.remote import RemoteIndex, create_index_app
from tests.conftest import free_port, wait_for
from tests.test_index import item_ids, item_metadata, unit_vectors


class InProcessIndexServer:
    def __init__(self, folder):
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(create_index_app(folder), host="127.0.0.1",
                                                    port=int(self.url.rsplit(":", 1)[1]), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20, 0.02, "the index server")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def index_server(tmp_path):
    server = InProcessIndexServer(tmp_path / "index")
    yield server
    server.stop()


def hits_of(rows):
    return [[(h.id, round(h.score, 5), h.metadata) for h in row] for row in rows]


def test_remote_index_answers_as_the_local_one_and_persists(tmp_path, index_server):
    remote, local = RemoteIndex(index_server.url), VectorIndex(IndexConfig(dim=32))
    assert not remote.exists() and len(remote) == 0
    ids, vectors, metadata = item_ids(300), unit_vectors(300), item_metadata(300)
    for index in (remote, local):
        index.add(ids[:200], vectors[:200], metadata[:200])
        index.add(ids[200:], vectors[200:], metadata[200:])
        assert index.delete(ids[:10] + ["unknown"]) == 10
    queries = unit_vectors(5, seed=1)
    for filters in (None, {"colour": "Red"}, {"colour": ["Red", "Blue"], "gender": "Women"}):
        assert hits_of(remote.search(queries, k=7, filters=filters)) == hits_of(local.search(queries, k=7, filters=filters))
    assert hits_of(remote.search(queries[0], k=3)) == hits_of(local.search(queries[0], k=3))
    assert len(remote) == 290 and ids[50] in remote and ids[0] not in remote
    assert remote.metadata(ids[50]) == metadata[50]
    index_server.stop()  # the owner's folder holds every acknowledged write
    assert hits_of(VectorIndex.load(tmp_path / "index").search(queries, k=7)) == hits_of(local.search(queries, k=7))
    again = InProcessIndexServer(tmp_path / "index")
    try:
        assert hits_of(RemoteIndex(again.url).search(queries, k=7)) == hits_of(local.search(queries, k=7))
    finally:
        again.stop()


def test_bad_input_is_the_same_error_naming_the_field_and_changes_nothing(index_server):
    remote = RemoteIndex(index_server.url)
    remote.add(item_ids(3), unit_vectors(3), item_metadata(3))
    cases = [(lambda: remote.add(item_ids(1, 9), np.zeros((1, 32)), None), "vectors"),
             (lambda: remote.add(item_ids(1, 9), unit_vectors(1, dim=8), None), "vectors"),
             (lambda: remote.add(["a", "a"], unit_vectors(2), None), "ids"),
             (lambda: remote.search(unit_vectors(1), k=0), "k"),
             (lambda: remote.search(unit_vectors(1), filters={"colour": []}), "filters.colour")]
    for call, field in cases:
        with pytest.raises(IndexInputError) as caught:
            call()
        assert caught.value.field == field
    assert len(remote) == 3


def test_concurrent_writers_see_each_others_near_duplicates(index_server):
    """Two workers enrich copies of one design at once: the owner's lock makes exactly one of them the duplicate."""
    base = unit_vectors(1, seed=7)[0]
    found: dict[str, object] = {}

    def enrich(name: str, seed: int) -> None:
        noise = np.random.default_rng(seed).standard_normal(32).astype(np.float32) * 0.01
        found[name] = RemoteIndex(index_server.url).add_with_near_duplicates([name], (base + noise)[None, :],
                                                                             [{"kind": "generated"}], 0.95)[0]

    threads = [threading.Thread(target=enrich, args=(f"item-{n}", n)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flagged = [name for name, duplicate in found.items() if duplicate is not None]
    assert len(flagged) == 1
    assert found[flagged[0]][0] in found and found[flagged[0]][1] > 0.95
    assert len(RemoteIndex(index_server.url)) == 2
    assert RemoteIndex(index_server.url, "products").exists() is False
