"""Several machines, one catalog: three homes that share nothing on disk (two workers, one API
server, each its own GENSHOP_HOME) and an index owner in a fourth, joined only by PostgreSQL,
Redis, a real S3 API (moto's server on loopback) and the index owner's HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ApiServer, WorkerProcess, free_port, make_env, wait_for
from tests.test_store_and_generation import postgres_url  # noqa: F401 - fixture

TOKENS = "alice:token-alice,bob:token-bob"


class IndexOwner:
    """``genshop index serve`` in its own process group and home."""

    def __init__(self, env: dict[str, str], log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "genshop.cli", "index", "serve", "--port",
                                      self.url.rsplit(":", 1)[1]], env=env, stdout=open(log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> "IndexOwner":
        def answers():
            assert self.proc.poll() is None, f"index owner exited: {self.log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(answers, timeout, 0.2, "the index owner to answer")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)


def test_two_workers_and_an_api_that_share_nothing_on_disk_make_one_catalog(
        tmp_path, models_dir, open_clip_dir, s3_server, postgres_url):  # noqa: F811
    prefix = f"shop-{uuid.uuid4().hex[:8]}"
    shared = {"GENSHOP_DATABASE_URL": postgres_url, "GENSHOP_IMAGES_URL": f"s3://{s3_server.bucket}/{prefix}",
              "GENSHOP_EMBEDDING_MODEL": str(open_clip_dir), "GENSHOP_UNDERSTANDING": "off",
              "GENSHOP_API_TOKENS": TOKENS, **s3_server.env}
    base = make_env(tmp_path / "unused", models_dir, **shared)  # one set of queue names for every process
    homes = {name: tmp_path / name for name in ("worker-a", "worker-b", "api", "index")}
    envs = {name: {**base, "GENSHOP_HOME": str(home)} for name, home in homes.items()}
    owner = IndexOwner(envs["index"], tmp_path / "index.log")  # its address is known before it answers:
    for name in ("worker-a", "worker-b", "api"):  # every process starts at once
        envs[name]["GENSHOP_INDEX_URL"] = owner.url
    workers = [WorkerProcess(envs[name], tmp_path / f"{name}.log", name=name) for name in ("worker-a", "worker-b")]
    server = ApiServer(envs["api"], tmp_path / "api.log")
    try:
        owner.wait_ready()
        server.wait_ready()
        for worker in workers:
            worker.wait_ready()
        api = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer token-alice"}, timeout=30)
        ids = []
        for n in range(6):
            response = api.post("/api/briefs", json={"title": f"Women's red kurta {n}", "variants": 2, "seed": n,
                                                     "steps": 2})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])

        def enriched():
            items = [item for brief_id in ids for item in api.get(f"/api/briefs/{brief_id}/items").json()]
            return len(items) == 12 and all(item["understanding"] for item in items) and items
        items = wait_for(enriched, 120, 0.5, "every brief generated and enriched")
        for brief_id in ids:
            assert api.get(f"/api/briefs/{brief_id}").json()["status"] == "succeeded"

        # both workers generated some of them
        logs = {w.log.name: w.log.read_text(errors="replace") for w in workers}
        ran = {name: [b for b in ids if f"generate-{b}] received" in text] for name, text in logs.items()}
        assert all(ran.values()), ran

        # every image is in the bucket, none on a worker's or the API's disk outside its read cache
        objects = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/")["Contents"]
        assert len(objects) == len({item["id"] for item in items}) or len(objects) >= 6
        for home in homes.values():
            assert not (home / "images").exists()
        assert not (homes["api"] / "cache").exists()  # nothing served yet: the API never wrote an image
        for item in items:
            image = api.get(item["image_url"])
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), item["image_url"]

        # text search on the API finds the items both workers made, through the one index
        hits = api.get("/api/search", params={"q": "red kurta", "k": 20}).json()
        found = {hit["id"] for hit in hits}
        assert {item["id"] for item in items} <= found
        assert not (homes["worker-a"] / "index").exists() and not (homes["api"] / "index").exists()
        assert (homes["index"] / "index" / "manifest.json").is_file()
        # another designer sees none of alice's items
        assert httpx.get(f"{server.url}/api/search", params={"q": "red kurta"},
                         headers={"Authorization": "Bearer token-bob"}).json() == []
    finally:
        server.stop()
        for worker in workers:
            worker.stop()
        owner.stop()
