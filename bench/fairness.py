"""Fairness of the generation queue among designers, FIFO against genshop's priorities, side by side.

One real `genshop worker` (one process, tiny-random) and one backlog, twice: a heavy designer's
N briefs, then a light designer's one brief, then a third designer's brief at the front
(`priority: high`), all queued behind a blocker brief the worker is running. Once with every
brief at one Celery priority (what a plain queue does: first in, first out), once through
`genshop.service.enqueue_brief` (high before normal, each designer's briefs spread over their
band, `genshop.queueing`). Printed: the position each brief ran at and the light and front
briefs' waits (from submit to start), and the ratio of the light brief's wait FIFO / fair.
Targets: the front brief runs first, the light designer's brief by third (after at most the
heavy designer's first), with the worker's default gathering (``GENSHOP_GATHER_MAX`` 8).

    python bench/fairness.py [--heavy 10]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: the repository on sys.path

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heavy", type=int, default=10, help="briefs of the heavy designer")
    parser.add_argument("--broker", default=os.environ.get("GENSHOP_BROKER_URL", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="genshop-bench-"))
    os.environ.update(GENSHOP_HOME=str(home), GENSHOP_PRESET="tiny-random", GENSHOP_BROKER_URL=args.broker,
                      GENSHOP_QUEUE=f"bench-{uuid.uuid4().hex[:8]}", GENSHOP_TORCH_THREADS="1",
                      GENSHOP_EMBEDDING_MODEL="off", GENSHOP_REWARD_MODEL="off")
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    from genshop.briefs import parse_brief
    from genshop.pipelines import ensure_weights
    from genshop.presets import load_preset
    from genshop.service import enqueue_brief, submit_brief
    from genshop.store import open_store
    from workers.app import enqueue_generation, enqueue_new_brief

    console = Console()
    ensure_weights(load_preset("tiny-random"))
    store = open_store()
    worker = subprocess.Popen([sys.executable, "-m", "genshop.cli", "worker", "-c", "1", "--queues",
                               os.environ["GENSHOP_QUEUE"]], stdout=open(home / "worker.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    small = {"variants": 2, "steps": 20, "width": 64, "height": 64, "seed": 1}
    blocker = {"variants": 4, "steps": 30, "width": 64, "height": 64, "seed": 2}

    def run(mode: str) -> list:
        def submit(title: str, designer: str, fields: dict, priority: str = "normal"):
            record, _ = submit_brief(store, parse_brief({"title": title, **fields, "priority": priority}),
                                     "tiny-random", designer)
            if mode == "fifo":
                store.mark_enqueued(record.id, enqueue_generation(record.id, 5))
                return store.get_brief(record.id)
            return enqueue_brief(store, record.id, enqueue_new_brief)

        first = submit(f"{mode} blocker", "blocker", blocker)
        while store.get_brief(first.id).status == "queued":
            time.sleep(0.05)
        backlog = [submit(f"heavy {n}", "heavy", small) for n in range(args.heavy)]
        backlog += [submit("light", "light", small), submit("front", "front", small, "high")]
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{mode}: the backlog", total=len(backlog))
            while (done := sum(store.get_brief(r.id).is_terminal for r in backlog)) < len(backlog):
                bar.update(task, completed=done)
                time.sleep(0.1)
        return store.get_brief(first.id), sorted((store.get_brief(r.id) for r in backlog), key=lambda r: r.started_at)

    try:
        results = {mode: run(mode) for mode in ("fifo", "fair")}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    table = Table("mode", "execution order", "light: position", "light: wait (s)", "front: position",
                  "front: wait (s)", title=f"{args.heavy} heavy briefs, then 1 light, then 1 front, one worker process")
    waits = {}
    for mode, (blocked, ran) in results.items():
        names = [r.title.replace("heavy ", "h") for r in ran]
        position = {r.title: n + 1 for n, r in enumerate(ran)}
        wait = {r.title: max(0.0, (r.started_at - blocked.finished_at).total_seconds()) for r in ran}
        waits[mode] = wait["light"]
        table.add_row(mode, " ".join(names), str(position["light"]), f"{wait['light']:.2f}", str(position["front"]),
                      f"{wait['front']:.2f}")
    console.print(table)
    fair = {r.title: n + 1 for n, r in enumerate(results["fair"][1])}
    met = fair["front"] == 1 and fair["light"] <= 3
    console.print(f"light designer's wait, FIFO / fair: {waits['fifo'] / max(waits['fair'], 1e-3):.1f}x  "
                  + escape(f"[target: front 1st, light by 3rd: {'met' if met else 'missed'}]"))


if __name__ == "__main__":
    main()
