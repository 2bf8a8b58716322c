"""Queue overhead and batching on the tiny-random preset, measured side by side in one run.

1. Per-task queue overhead: the same small brief run (a) by calling the task's code
   directly in this process and (b) through Redis and a real `genshop worker`, one at a
   time, with the prefork pool (the default: a killable child enforces the hard time
   limit) and the solo pool (no pipe hop to a child). Direct and queued calls alternate,
   so drift in the machine's speed hits both; overhead = each queued round trip minus
   the direct call made just before it. Target p50 <= 3 ms.
2. Worker images/s with variants batched into one pipeline call against one variant
   per call (same code path, `run_brief`, only the preset's batch size differs).
   Target >= 3x.

    python bench/queue.py [--tasks 200] [--variants 32]
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
    parser.add_argument("--variants", type=int, default=32)
    parser.add_argument("--broker", default=os.environ.get("GENSHOP_BROKER_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process and the worker (more than 1: their spinning OpenMP "
                             "threads compete for the cores and inflate the measured overhead)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="genshop-bench-"))
    os.environ.update(GENSHOP_HOME=str(home), GENSHOP_PRESET="tiny-random", GENSHOP_BROKER_URL=args.broker,
                      GENSHOP_QUEUE=f"bench-{uuid.uuid4().hex[:8]}", GENSHOP_TORCH_THREADS=str(args.threads))
    import torch
    from celery.result import AsyncResult
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    from genshop.briefs import parse_brief
    from genshop.pipelines import load_pipeline
    from genshop.service import run_brief, submit_brief
    from genshop.store import open_store
    from workers.app import app, enqueue_generation

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
        run_brief(store, brief_id, loaded, max_attempts=2)
        return (time.perf_counter() - started) * 1000

    def queued_call(n: int) -> float:
        brief_id = new_brief(n)
        started = time.perf_counter()
        AsyncResult(enqueue_generation(brief_id), app=app).get(timeout=60, interval=0.01)
        return (time.perf_counter() - started) * 1000

    def paired_round_trips(pool: str) -> tuple[list[float], list[float]]:
        """(direct, queued): each queued call right after a direct call of an identical brief."""
        worker = subprocess.Popen(
            [sys.executable, "-m", "genshop.cli", "worker", "-c", "1", "--loglevel=warning", f"--pool={pool}",
             f"--queues={os.environ['GENSHOP_QUEUE']}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for n in range(10):  # warm-up, and wait for the worker to be up
                direct_call(n)
                AsyncResult(enqueue_generation(new_brief(n)), app=app).get(timeout=120)
            pairs = [(direct_call(n), queued_call(n)) for n in range(args.tasks)]
            return [d for d, _ in pairs], [q for _, q in pairs]
        finally:
            worker.terminate()
            worker.wait(timeout=30)

    measured = {pool: paired_round_trips(pool) for pool in ("prefork", "solo")}

    # -- 2. batched variants vs one variant per call --------------------------------------
    def images_per_second(batch_size: int) -> float:
        batched = loaded.preset.model_copy(update={"defaults": loaded.preset.defaults.model_copy(
            update={"batch_size": batch_size})})
        pipeline = type(loaded)(**{**loaded.__dict__, "preset": batched})
        brief_id = new_brief(0, variants=args.variants, steps=4, width=32, height=32, guidance_scale=5.0)
        started = time.perf_counter()
        run_brief(store, brief_id, pipeline, max_attempts=2)
        return args.variants / (time.perf_counter() - started)

    images_per_second(8)  # warm-up
    one, batched = images_per_second(1), images_per_second(min(32, args.variants))

    table = Table(title=f"bench/queue.py — tiny-random, {args.tasks} tasks, torch threads={args.threads}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for pool, (direct, queued) in measured.items():
        overhead = [q - d for d, q in zip(direct, queued)]
        table.add_row(f"{pool} pool: direct call p50 / p95 (ms)",
                      f"{statistics.median(direct):.2f} / {percentile(direct, 0.95):.2f}")
        table.add_row(f"{pool} pool: through Redis + worker p50 / p95 (ms)",
                      f"{statistics.median(queued):.2f} / {percentile(queued, 0.95):.2f}")
        table.add_row(f"{pool} pool: queue overhead per pair p50 / p95 (ms)  \\[target p50 <= 3]",
                      f"{statistics.median(overhead):.2f} / {percentile(overhead, 0.95):.2f}")
    table.add_row("images/s, one variant per call", f"{one:.1f}")
    table.add_row(f"images/s, {min(32, args.variants)} variants per call", f"{batched:.1f}")
    table.add_row("batching speed-up  \\[target >= 3x]", f"{batched / one:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
