"""Queue overhead and batching across briefs, measured side by side in one run.

1. Per-task queue overhead (tiny-random): the same small brief run (a) by calling the task's
   code directly in this process and (b) through Redis and a real `genshop worker`, one at a
   time, with the prefork pool (the default: a killable child enforces the hard time limit)
   and the solo pool (no pipe hop to a child). Direct and queued calls alternate, so drift in
   the machine's speed hits both; overhead = each queued round trip minus the direct call
   made just before it. The direct call does the task's whole work, the follow-up it queues
   (enrich) included, so the difference is what the queue adds. Beside them, Celery and Redis
   alone: a round trip of Celery's built-in ``celery.accumulate`` (no code of ours) through
   the same worker. Target p50 <= 3 ms.
2. Batching across briefs: ``--briefs`` briefs of 1 variant (the preset's steps and size)
   queued at once, through a real worker that gathers them (``GENSHOP_GATHER_MAX=8``: shared
   pipeline calls of up to the preset's batch size) against one that runs one brief at a time
   (``GENSHOP_GATHER_MAX=1``), on tiny-random and mini: images/s from the first enqueue to the
   last result. Target >= 3x on tiny-random.

    python bench/queue.py [--tasks 200] [--briefs 64] [--presets tiny-random mini]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: keeps this file from shadowing the stdlib's queue

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--briefs", type=int, default=64, help="briefs of 1 variant queued at once (part 2)")
    parser.add_argument("--presets", nargs="+", default=["tiny-random", "mini"], help="presets of part 2")
    parser.add_argument("--broker", default=os.environ.get("GENSHOP_BROKER_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process and the worker (more than 1: their spinning OpenMP "
                             "threads compete for the cores and inflate the measured overhead)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="genshop-bench-"))
    os.environ.update(GENSHOP_HOME=str(home), GENSHOP_PRESET="tiny-random", GENSHOP_BROKER_URL=args.broker,
                      GENSHOP_QUEUE=f"bench-{uuid.uuid4().hex[:8]}", GENSHOP_TORCH_THREADS=str(args.threads),
                      GENSHOP_ENRICH_QUEUE=f"bench-enrich-{uuid.uuid4().hex[:8]}",
                      GENSHOP_SCORE_QUEUE=f"bench-score-{uuid.uuid4().hex[:8]}")
    import redis
    import torch
    from celery.result import AsyncResult
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    torch.set_num_threads(args.threads)
    from genshop.briefs import parse_brief
    from genshop.pipelines import load_pipeline
    from genshop.service import run_brief, submit_brief
    from genshop.store import open_store
    from workers.app import app, enqueue_generation
    from workers.tasks import send_followups

    console = Console()
    store = open_store()
    loaded = load_pipeline("tiny-random")
    small = {"variants": 1, "steps": 1, "width": 16, "height": 16, "guidance_scale": 1.0}

    def new_brief(n: int, **fields) -> str:
        return submit_brief(store, parse_brief({"title": f"bench {n}", "seed": n, **small, **fields}), "tiny-random")[0].id

    # -- 1. direct call vs through the queue, interleaved pair by pair -------------------
    def direct_call(n: int) -> float:
        brief_id = new_brief(n)
        started = time.perf_counter()
        run_brief(store, brief_id, loaded, max_attempts=2, followups=lambda records: list(send_followups(records)))
        return (time.perf_counter() - started) * 1000

    def celery_alone() -> float:
        started = time.perf_counter()
        app.send_task("celery.accumulate", args=[1], queue=os.environ["GENSHOP_QUEUE"]).get(timeout=60, interval=0.01)
        return (time.perf_counter() - started) * 1000

    def queued_call(n: int) -> float:
        brief_id = new_brief(n)
        started = time.perf_counter()
        AsyncResult(enqueue_generation(brief_id), app=app).get(timeout=60, interval=0.01)
        return (time.perf_counter() - started) * 1000

    def start_worker(pool: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "genshop.cli", "worker", "-c", "1", "--loglevel=warning", f"--pool={pool}",
             f"--queues={os.environ['GENSHOP_QUEUE']}"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(worker: subprocess.Popen) -> None:
        worker.terminate()
        worker.wait(timeout=60)

    def paired_round_trips(pool: str) -> tuple[list[float], list[float], list[float]]:
        """(direct, queued, Celery alone): each queued call right after a direct call of an identical brief."""
        worker = start_worker(pool)
        try:
            for n in range(10):  # warm-up, and wait for the worker to be up
                direct_call(n)
                AsyncResult(enqueue_generation(new_brief(n)), app=app).get(timeout=120)
            trips = [(direct_call(n), queued_call(n), celery_alone()) for n in range(args.tasks)]
            return [d for d, _, _ in trips], [q for _, q, _ in trips], [c for *_, c in trips]
        finally:
            stop(worker)

    measured = {pool: paired_round_trips(pool) for pool in ("prefork", "solo")}

    # -- 2. briefs batched across by the worker vs one brief at a time ---------------------------
    def briefs_per_second(preset: str, gather_max: int) -> float:
        worker = start_worker("prefork", GENSHOP_PRESET=preset, GENSHOP_GATHER_MAX=str(gather_max))
        try:
            AsyncResult(enqueue_generation(submit_brief(store, parse_brief(
                {"title": "warm-up", "variants": 1, "seed": 0}), preset)[0].id), app=app).get(timeout=300)
            ids = [submit_brief(store, parse_brief({"title": f"bench {preset} {n}", "variants": 1, "seed": n}),
                                preset)[0].id for n in range(args.briefs)]
            started = time.perf_counter()
            results = [AsyncResult(enqueue_generation(brief_id), app=app) for brief_id in ids]
            for result in track(results, description=f"{preset}, gather {gather_max}", console=console):
                assert result.get(timeout=1800)["status"] == "succeeded"
            return args.briefs / (time.perf_counter() - started)
        finally:
            stop(worker)

    rates = {preset: (briefs_per_second(preset, 1), briefs_per_second(preset, 8)) for preset in args.presets}
    # the follow-up messages (enrich) that no worker here serves
    redis.Redis.from_url(args.broker).delete(os.environ["GENSHOP_ENRICH_QUEUE"], os.environ["GENSHOP_SCORE_QUEUE"])

    table = Table(title=f"bench/queue.py — {args.tasks} tasks (part 1), {args.briefs} briefs of 1 variant (part 2), "
                        f"torch threads={args.threads}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for pool, (direct, queued, alone) in measured.items():
        overhead = [q - d for d, q in zip(direct, queued)]
        table.add_row(f"{pool} pool: direct call p50 / p95 (ms)",
                      f"{statistics.median(direct):.2f} / {percentile(direct, 0.95):.2f}")
        table.add_row(f"{pool} pool: through Redis + worker p50 / p95 (ms)",
                      f"{statistics.median(queued):.2f} / {percentile(queued, 0.95):.2f}")
        table.add_row(f"{pool} pool: queue overhead per pair p50 / p95 (ms)  \\[target p50 <= 3]",
                      f"{statistics.median(overhead):.2f} / {percentile(overhead, 0.95):.2f}")
        table.add_row(f"{pool} pool: Celery + Redis alone (celery.accumulate) p50 / p95 (ms)",
                      f"{statistics.median(alone):.2f} / {percentile(alone, 0.95):.2f}")
    for preset, (one, batched) in rates.items():
        target = "  \\[target >= 3x]" if preset == "tiny-random" else ""
        table.add_row(f"{preset}: images/s, one brief at a time", f"{one:.2f}")
        table.add_row(f"{preset}: images/s, batched across briefs (gather 8)", f"{batched:.2f}")
        table.add_row(f"{preset}: batching speed-up{target}", f"{batched / one:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
