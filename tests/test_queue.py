"""The queue end to end: real Redis, a real `genshop worker` subprocess, the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from celery import Celery
from celery.result import AsyncResult

from genshop.store import Store
from tests.conftest import WorkerProcess, cli_json, cli_json_here, make_env, run_cli, wait_for, write_brief

LONG = {"variants": 16, "steps": 100, "width": 128, "height": 128}  # seconds of denoising, even on a fast machine


@pytest.fixture(scope="module")
def queue_env(tmp_path_factory, models_dir):
    home = tmp_path_factory.mktemp("queue-home")
    env = make_env(home, models_dir)
    worker = WorkerProcess(env, home / "worker.log").wait_ready()
    yield env
    worker.stop()


@pytest.fixture(scope="module")
def store(queue_env):
    return Store(f"sqlite:///{Path(queue_env['GENSHOP_HOME']) / 'genshop.db'}", queue_env["GENSHOP_HOME"])


@pytest.fixture(scope="module")
def celery_app(queue_env):
    return Celery(broker=queue_env["GENSHOP_BROKER_URL"], backend=queue_env["GENSHOP_BROKER_URL"])


def submit(env, path: Path, *flags: str) -> dict:
    return cli_json(["submit", str(path), "--json", *flags], env)


def status_of(env, brief_id: str) -> dict:
    return cli_json_here(["status", brief_id, "--json"], env)  # the store read in this process


def test_submit_wait_and_read_back_results(queue_env, tmp_path):
    brief = write_brief(tmp_path / "b.json", variants=6, seed=100)
    submitted = submit(queue_env, brief, "--wait")
    assert submitted["status"] == "succeeded" and submitted["created"] is True
    results = cli_json_here(["results", submitted["brief_id"], "--json"], queue_env)
    assert results["brief_id"] == submitted["brief_id"] and results["status"] == "succeeded"
    assert [(i["variant"], i["seed"]) for i in results["items"]] == [(v, 100 + v) for v in range(6)]
    for item in results["items"]:
        assert Path(item["image_path"]).is_file() and item["id"]


def test_progress_is_visible_in_task_meta_and_status(queue_env, tmp_path, celery_app):
    submitted = submit(queue_env, write_brief(tmp_path / "b.json", **{**LONG, "variants": 4}))
    task = AsyncResult(submitted["task_id"], app=celery_app)
    meta = wait_for(lambda: task.state == "RUNNING" and task.info.get("step") and task.info, 60, what="RUNNING meta")
    assert meta["brief_id"] == submitted["brief_id"] and meta["variants_total"] == 4 and meta["steps"] == 100
    running = wait_for(lambda: (s := status_of(queue_env, submitted["brief_id"]))["status"] == "running"
                       and s["progress"] and s, 30, what="running status")
    assert 0 < running["progress"]["step"] <= 100
    assert task.get(timeout=120)["status"] == "succeeded"
    assert status_of(queue_env, submitted["brief_id"])["progress"]["variants_done"] == 4


def test_cancelling_a_running_brief_stops_it_at_the_next_step(queue_env, tmp_path, store, celery_app):
    submitted = submit(queue_env, write_brief(tmp_path / "b.json", **LONG))
    wait_for(lambda: store.get_brief(submitted["brief_id"]).progress.get("step", 0) >= 2, 60, what="denoising")
    proc = run_cli(["cancel", submitted["brief_id"], "--json"], queue_env)
    assert proc.returncode == 0, proc.stderr
    record = wait_for(lambda: (r := store.get_brief(submitted["brief_id"])).is_terminal and r, 30, what="cancelled")
    assert record.status == "cancelled"
    assert len(store.list_items(record.id)) < 16
    wait_for(lambda: AsyncResult(submitted["task_id"], app=celery_app).state == "REVOKED", 10, what="REVOKED state")


def test_cancelling_a_queued_brief_means_it_never_runs(queue_env, tmp_path, store, celery_app):
    busy = submit(queue_env, write_brief(tmp_path / "busy.json", **LONG))
    queued = submit(queue_env, write_brief(tmp_path / "queued.json", variants=2))
    assert cli_json(["cancel", queued["brief_id"], "--json"], queue_env)["status"] == "cancelled"
    wait_for(lambda: store.get_brief(busy["brief_id"]).progress.get("step", 0) >= 1, 60, what="the busy brief to run")
    assert cli_json(["cancel", busy["brief_id"], "--json"], queue_env)  # frees the worker for the queued message
    wait_for(lambda: store.get_brief(busy["brief_id"]).is_terminal, 60, what="the busy brief")
    wait_for(lambda: AsyncResult(queued["task_id"], app=celery_app).state == "REVOKED", 30,
             what="the worker to take and discard the queued message")
    record = store.get_brief(queued["brief_id"])
    assert record.status == "cancelled" and record.attempts == 0 and store.list_items(record.id) == []


def test_resubmitting_the_same_client_reference_returns_the_first_brief(queue_env, tmp_path, store, redis_client):
    path = write_brief(tmp_path / "b.json", variants=3, client_reference=f"ref-{tmp_path.name}")
    first = submit(queue_env, path, "--wait")
    path.write_text(json.dumps({"title": "Something else", "variants": 9, "client_reference": f"ref-{tmp_path.name}"}))
    second = submit(queue_env, path)
    assert second["brief_id"] == first["brief_id"] and second["created"] is False and second["title"] == first["title"]
    assert redis_client.llen(queue_env["GENSHOP_QUEUE"]) == 0
    assert len(store.list_items(first["brief_id"])) == 3


def test_the_pipeline_is_loaded_once_per_worker_process_not_in_the_parent(queue_env, tmp_path, celery_app):
    results = []
    for n in range(3):
        submitted = submit(queue_env, write_brief(tmp_path / f"b{n}.json", variants=1))
        results.append(AsyncResult(submitted["task_id"], app=celery_app).get(timeout=60))
    assert {r["pipeline_loads"] for r in results} == {1}
    pids = {r["worker_pid"] for r in results}
    assert len(pids) == 1 and pids.pop() != os.getpid()


def test_a_brief_that_cannot_be_generated_fails_with_its_error(queue_env, tmp_path, store, celery_app):
    from genshop.briefs import parse_brief

    # stored by an older client without the size check: 36 is not a multiple of the VAE's 8
    record, _ = store.create_brief(parse_brief({"title": "x", "variants": 1, "steps": 1, "seed": 1, "width": 36,
                                                "height": 32, "guidance_scale": 1.0, "negative_prompt": ""}),
                                   "tiny-random")
    task = celery_app.send_task("genshop.generate_brief", args=[record.id], queue=queue_env["GENSHOP_QUEUE"])
    with pytest.raises(Exception):
        task.get(timeout=60)
    assert task.state == "FAILURE"
    status = status_of(queue_env, record.id)
    assert status["status"] == "failed" and "divisible by 8" in status["error"]
    proc = run_cli(["status", record.id], queue_env)
    assert proc.returncode == 0 and "divisible by 8" in proc.stdout



CLI_WITHOUT_TORCH = """
import sys
from genshop.cli import main
brief_file, brief_id = sys.argv[1:]
for args in (["submit", brief_file, "--json"], ["status", brief_id, "--json"], ["cancel", brief_id, "--json"]):
    try:
        main(args, standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
print("torch imported" if "torch" in sys.modules else "no torch")
"""


def test_queueing_checking_and_cancelling_a_brief_never_imports_torch(queue_env, tmp_path):
    """submit, status and cancel talk only to the store and Redis: a designer's CLI call (and the
    tests' many) does not pay the seconds that importing torch and diffusers takes."""
    import subprocess
    import sys

    brief = write_brief(tmp_path / "b.json", variants=1, steps=1, width=16, height=16)
    queued = submit(queue_env, brief)
    proc = subprocess.run([sys.executable, "-c", CLI_WITHOUT_TORCH, str(brief), queued["brief_id"]], env=queue_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "no torch", proc.stdout[-2000:]
