"""Faults and load: a worker killed mid-brief, 1,000 briefs through 2 processes with a Redis restart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from genshop.store import Store
from tests.conftest import cli_json, free_port, make_env, wait_for, write_brief


def test_a_brief_whose_worker_is_killed_completes_once_a_worker_is_back(tmp_path, models_dir, start_worker):
    env = make_env(tmp_path / "home", models_dir, GENSHOP_HARD_TIME_LIMIT="40", GENSHOP_VISIBILITY_TIMEOUT="45")
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    first = start_worker(env)
    brief = write_brief(tmp_path / "b.json", variants=16, steps=40, width=128, height=128, seed=9)
    submitted = cli_json(["submit", str(brief), "--json"], env)
    brief_id = submitted["brief_id"]
    wait_for(lambda: 8 <= len(store.list_items(brief_id)) < 16, 60, 0.02, what="the first batch to be stored")
    first.kill()  # SIGKILL to the whole worker: no chance to ack, reject or clean up
    before = {i.variant: i.image_sha256 for i in store.list_items(brief_id)}
    assert store.get_brief(brief_id).status == "running" and 8 <= len(before) < 16

    start_worker(env)
    record = wait_for(lambda: (r := store.get_brief(brief_id)).is_terminal and r, 120, 0.5, what="redelivery")
    items = store.list_items(brief_id)
    assert (record.status, record.attempts) == ("succeeded", 2), record.error
    assert [i.variant for i in items] == list(range(16))
    assert {i.variant: i.image_sha256 for i in items if i.variant in before} == before


SUBMIT_MANY = """
import sys
from genshop.briefs import parse_brief
from genshop.service import submit_brief
from genshop.settings import get_settings
from genshop.store import open_store
from workers.app import enqueue_generation
store = open_store()
for n in range(int(sys.argv[1])):
    brief = parse_brief({"title": f"load brief {n}", "variants": 1, "steps": 1, "width": 16, "height": 16,
                         "guidance_scale": 1.0, "seed": n, "client_reference": f"load-{n}"})
    record, _ = submit_brief(store, brief, get_settings().preset)
    store.mark_enqueued(record.id, enqueue_generation(record.id))
"""


class RedisServer:
    """A Redis of the test's own, persisting every write (AOF), so a restart loses nothing."""

    def __init__(self, directory: Path):
        self.port, self.directory = free_port(), directory
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.directory / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        wait_for(lambda: self._ping(client), 10, what="redis to start")

    @staticmethod
    def _ping(client) -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    def restart(self) -> None:
        try:
            redis.Redis(port=self.port).shutdown()
        except redis.ConnectionError:
            pass
        self.proc.wait(timeout=30)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_1000_briefs_through_2_processes_survive_a_redis_restart(tmp_path, models_dir, own_redis, start_worker):
    n = 1000
    env = make_env(tmp_path / "home", models_dir, GENSHOP_BROKER_URL=f"redis://127.0.0.1:{own_redis.port}/0",
                   GENSHOP_HARD_TIME_LIMIT="30", GENSHOP_VISIBILITY_TIMEOUT="40")
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    start_worker(env, concurrency=2)
    subprocess.run([sys.executable, "-c", SUBMIT_MANY, str(n)], env=env, check=True, timeout=300)
    assert len(store.list_briefs()) == n

    wait_for(lambda: len(store.list_briefs("succeeded")) >= n // 4, 300, 0.2, what="a quarter of the briefs")
    done_before_restart = len(store.list_briefs("succeeded"))
    assert done_before_restart < n, "the restart must happen while briefs are still queued"
    own_redis.restart()

    start = time.monotonic()
    wait_for(lambda: len(store.list_briefs("succeeded")) == n, 600, 0.5, what="every brief to finish")
    briefs = store.list_briefs()
    assert len(briefs) == n and {b.status for b in briefs} == {"succeeded"}
    assert store.count_items() == n
    assert all(len(store.list_items(b.id)) == 1 for b in briefs[:: max(1, n // 50)])
    assert time.monotonic() - start < 600
