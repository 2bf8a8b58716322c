"""Faults and load: a worker killed mid-brief, 1,000 briefs through 2 processes with a Redis restart, pool
processes killed, a backlog longer than the requeue delay, duplicate messages, a database down at worker start,
a disk full mid-brief."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from genshop.store import Store
from tests.conftest import cli_json, free_port, make_env, pool_pids, wait_for, write_brief


@pytest.mark.slow
def test_a_brief_whose_worker_is_killed_completes_once_a_worker_is_back(tmp_path, models_dir, start_worker):
    env = make_env(tmp_path / "home", models_dir, GENSHOP_HARD_TIME_LIMIT="40", GENSHOP_VISIBILITY_TIMEOUT="45")
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    first = start_worker(env)
    brief = write_brief(tmp_path / "b.json", variants=16, steps=60, width=64, height=64, seed=9)  # 2 batches of 8
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
    subprocess.run([sys.executable, "-c", SUBMIT_MANY, str(n)], env=env, check=True, timeout=300)
    assert len(store.list_briefs()) == n
    start_worker(env, concurrency=2)  # after the backlog is queued: batched across briefs, the workers outrun a submit

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


# -- the pool, the requeue sweep, write errors (issue 17) ------------------------------------

SLOW = {"variants": 4, "steps": 40, "width": 128, "height": 128}  # a second or more of denoising
QUICK = {"variants": 2, "steps": 30, "width": 64, "height": 64}  # a fraction of a second

SUBMIT = """
import json, sys
from genshop.briefs import parse_brief
from genshop.service import submit_brief
from genshop.settings import get_settings
from genshop.store import open_store
from workers.app import enqueue_generation
store = open_store()
for n, fields in enumerate(json.loads(sys.argv[1])):
    record, _ = submit_brief(store, parse_brief({"title": f"brief {n}", "seed": n, **fields}), get_settings().preset)
    store.mark_enqueued(record.id, enqueue_generation(record.id))
    print(record.id)
"""


def submit_at_once(env: dict[str, str], *briefs: dict) -> list[str]:
    """Submit and enqueue several briefs from one process, milliseconds apart."""
    proc = subprocess.run([sys.executable, "-c", SUBMIT, json.dumps(list(briefs))], env=env, check=True, timeout=120,
                          capture_output=True, text=True)
    return proc.stdout.split()


def test_a_killed_idle_pool_process_is_replaced_and_the_pool_stays_full(tmp_path, models_dir, start_worker):
    """Celery's 4 s wait for a new process's UP message is shorter than its model load:
    every replacement was killed in turn and the pool shrank for good."""
    env = make_env(tmp_path / "home", models_dir)
    worker = start_worker(env, concurrency=2)
    pool = wait_for(lambda: len(p := pool_pids(worker)) == 2 and p, 30, what="a pool of 2")
    victim = min(pool)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: len(p := pool_pids(worker)) == 2 and victim not in p and p, 30, 0.1,
                        what="the pool to be full again")
    [new] = replaced - pool
    wait_for(lambda: f"pool process {new} loaded its models" in worker.log.read_text(), 60, 0.2,
             what="the replacement to load its models")
    # both processes take work at once: the replacement reported UP and was kept
    brief_ids = submit_at_once(env, QUICK, QUICK)
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    wait_for(lambda: all(store.get_brief(b).status == "succeeded" for b in brief_ids), 120, 0.2, what="both briefs")
    assert "Timed out waiting for UP" not in worker.log.read_text()
    assert pool_pids(worker) == replaced
    first, second = (store.get_brief(b) for b in brief_ids)
    assert first.started_at < second.finished_at and second.started_at < first.finished_at


SUBMIT_BACKLOG = """
import sys
from genshop.briefs import parse_brief
from genshop.service import submit_brief
from genshop.settings import get_settings
from genshop.store import open_store
from workers.app import enqueue_generation
store = open_store()
queued, lost = int(sys.argv[1]), int(sys.argv[2])
for n in range(queued + lost):
    brief = parse_brief({"title": f"backlog {n}", "variants": 2, "steps": 4, "width": 64, "height": 64, "seed": n})
    record, _ = submit_brief(store, brief, get_settings().preset)
    # the lost ones: stored as enqueued, but their message never reached Redis
    store.mark_enqueued(record.id, enqueue_generation(record.id) if n < queued else f"generate-{record.id}")
"""


def requeue_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "requeued" in line and "stale brief" in line]


def test_a_backlog_longer_than_the_requeue_delay_never_multiplies(tmp_path, models_dir, start_worker, redis_client):
    """30 queued briefs take several times the 1 s requeue delay to drain; 4 lost ones
    must come back once each, the queued ones never."""
    queued, lost = 30, 4
    env = make_env(tmp_path / "home", models_dir, GENSHOP_REQUEUE_AFTER="1")
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    subprocess.run([sys.executable, "-c", SUBMIT_BACKLOG, str(queued), str(lost)], env=env, check=True, timeout=120)
    worker = start_worker(env)
    peak = 0
    deadline = time.monotonic() + 240
    while len(store.list_briefs("succeeded")) < queued + lost and time.monotonic() < deadline:
        peak = max(peak, redis_client.llen(env["GENSHOP_QUEUE"]))
        time.sleep(0.1)
    briefs = store.list_briefs()
    assert {b.status for b in briefs} == {"succeeded"}, [b.status for b in briefs]
    assert peak <= queued + lost
    assert redis_client.llen(env["GENSHOP_QUEUE"]) == 0
    requeued = [i for line in requeue_lines(worker.log.read_text()) for i in line.rsplit(": ", 1)[1].split(", ")]
    assert sorted(requeued) == sorted(b.id for b in briefs if b.title.startswith("backlog") and
                                      int(b.title.split()[1]) >= queued)
    assert {b.attempts for b in briefs} == {1} and store.count_items() == 2 * (queued + lost)


def test_a_duplicate_message_never_runs_a_brief_twice_nor_queues_its_followups_again(
        tmp_path, models_dir, start_worker, redis_client):
    from celery import Celery

    env = make_env(tmp_path / "home", models_dir, GENSHOP_EMBEDDING_MODEL=str(tmp_path / "no-clip-needed"))
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    worker = start_worker(env, concurrency=2, queues=env["GENSHOP_QUEUE"])  # enrich messages stay in Redis
    [brief_id] = submit_at_once(env, SLOW)
    task_id = f"generate-{brief_id}"
    wait_for(lambda: store.get_brief(brief_id).progress.get("step", 0) >= 2, 60, what="the brief to run")
    sender = Celery(broker=env["GENSHOP_BROKER_URL"])

    def duplicate() -> None:  # what a sweep or a Redis restore used to add: the same task again
        sender.send_task("genshop.generate_brief", args=[brief_id], task_id=task_id, queue=env["GENSHOP_QUEUE"])

    def deliveries() -> int:  # handled messages: run (or found finished), or ignored as a duplicate
        log = worker.log.read_text()
        return log.count(f"[{task_id}] succeeded") + log.count(f"[{task_id}] ignored")

    duplicate()  # delivered to the second, idle process while the first runs the brief
    wait_for(lambda: deliveries() >= 1, 60, 0.1, what="the duplicate to be handled")
    assert f"[{task_id}] ignored" in worker.log.read_text()
    assert store.get_brief(brief_id).status == "running" and store.get_brief(brief_id).attempts == 1
    wait_for(lambda: store.get_brief(brief_id).status == "succeeded", 120, 0.1, what="the brief")
    wait_for(lambda: deliveries() >= 2, 30, 0.1, what="the first delivery to finish")
    duplicate()  # a redelivered message of a finished brief
    wait_for(lambda: deliveries() >= 3, 60, 0.1, what="the late duplicate to be handled")
    record = store.get_brief(brief_id)
    assert (record.status, record.attempts, len(store.list_items(brief_id))) == ("succeeded", 1, SLOW["variants"])
    assert redis_client.llen(env["GENSHOP_ENRICH_QUEUE"]) == 1  # enrich queued once, not once per delivery


def test_the_sweeper_survives_a_database_that_fails_at_worker_start(tmp_path, models_dir, start_worker):
    """The database does not exist when the worker starts (the sweeper's first store open
    fails); once it does, a brief whose message was lost is still requeued and run."""
    import psycopg

    from tests.test_store_and_generation import POSTGRES_ADMIN_URL

    name = f"genshop_test_{uuid.uuid4().hex[:8]}"
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    env = make_env(tmp_path / "home", models_dir, GENSHOP_DATABASE_URL=url, GENSHOP_REQUEUE_AFTER="2")
    worker = start_worker(env)
    try:
        wait_for(lambda: "requeue sweep failed" in worker.log.read_text() or worker.log.read_text().count(
            "does not exist") >= 2, 30, 0.2, what="the sweep to meet the missing database")
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        store = Store(url, tmp_path / "home")
        from genshop.briefs import parse_brief

        record, _ = store.create_brief(parse_brief({"title": "lost while the disk was full", "variants": 1, "steps": 1,
                                                    "width": 16, "height": 16, "guidance_scale": 1.0, "seed": 1,
                                                    "negative_prompt": ""}), "tiny-random")
        store.mark_enqueued(record.id, f"generate-{record.id}")  # its message never reached Redis
        done = wait_for(lambda: (r := store.get_brief(record.id)).is_terminal and r, 60, 0.2, what="the brief")
        assert done.status == "succeeded" and len(store.list_items(record.id)) == 1
        store.engine.dispose()
    finally:
        worker.stop()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def small_images_disk(tmp_path):
    """HOME/images on a 160 KiB tmpfs: room for the first batch of a brief, not the second."""
    images = tmp_path / "home" / "images"
    images.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(images)], capture_output=True)
    # a disk that really fills is the point of the test: no tmpfs (not root) fails it, never skips it
    assert mounted.returncode == 0, f"cannot mount a tmpfs (the suite runs as root): {mounted.stderr.decode().strip()}"
    yield images
    subprocess.run(["umount", "-l", str(images)], check=False)


def test_a_disk_full_mid_brief_leaves_no_orphan_pngs_and_no_tmp_files(tmp_path, models_dir, start_worker,
                                                                     small_images_disk):
    env = make_env(tmp_path / "home", models_dir)
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    start_worker(env)
    # 16 noise images of 64x64 (~12 KiB each as PNG): batch 1 (8) fits, batch 2 runs out of space
    submitted = cli_json(["submit", str(write_brief(tmp_path / "b.json", variants=16, steps=2, width=64, height=64,
                                                    seed=3)), "--json"], env)
    record = wait_for(lambda: (r := store.get_brief(submitted["brief_id"])).is_terminal and r, 120, 0.2,
                      what="the brief to end")
    assert record.status == "failed" and "No space left" in record.error, record.error
    items = store.list_items(record.id)
    on_disk = {p.relative_to(tmp_path / "home").as_posix() for p in small_images_disk.rglob("*.png")}
    assert 0 < len(items) < 16
    assert on_disk == {i.image_path for i in items}  # every PNG has its row, every row its PNG
    assert list(small_images_disk.rglob("*.tmp")) == []
