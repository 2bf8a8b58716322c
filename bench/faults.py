"""Load under faults: N briefs through 2 real workers while pool processes are SIGKILLed and
the broker is killed and restarted.

The run starts its own redis-server on a free port (AOF, fsync on every write, so a
SIGKILL of Redis loses nothing it acknowledged), submits N small tiny-random briefs, starts
`--workers` `genshop worker` processes of `--concurrency` pool processes each, and then,
until every brief has finished: every `--kill-every` seconds SIGKILLs one pool process of
a worker (picked at random among those done loading their models, so busy or idle, most
often mid-brief), and `--redis-restarts` times SIGKILLs Redis and
starts it again. The requeue delay (`--requeue-after`) is far shorter than the backlog's
drain time, as in issue 17.

It counts from the store and from Redis, and prints: briefs and items expected, stored,
duplicated and lost; requeues by the sweep against the briefs whose pool process died;
the peak queue length and the messages left at the end; and the pool size over time, with
the time each pool took to be full again after each kill (a new process, and that process
done loading its models, from its "loaded its models" log line).

Targets at N = 1,000: nothing lost or duplicated, requeues <= briefs whose process died,
every pool back to full size within 30 s of each kill.

    python bench/faults.py [--briefs 1000] [--workers 2] [--concurrency 2] [--kill-every 10]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: keeps bench/queue.py from shadowing the stdlib's queue

import argparse
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

POOL_FULL_TARGET_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> set[int]:
    """Live (not zombie) children of ``pid``, from /proc."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.add(int(stat.parent.name))
    return children


class PrivateRedis:
    """redis-server on a free port in ``directory``, appending every write to its AOF."""

    def __init__(self, directory: Path):
        self.port, self.directory, self.proc = free_port(), directory, None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.directory / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill_and_restart(self, down_s: float = 1.0) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Worker:
    """``genshop worker`` in its own process group; its pool is the children of the Celery
    main process, itself the child of the supervising ``genshop worker`` process."""

    def __init__(self, name: str, concurrency: int, log: Path):
        self.name, self.concurrency, self.log = name, concurrency, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genshop.cli", "worker", f"--concurrency={concurrency}", "--loglevel=info",
             f"--hostname={name}@%h"], stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def pool(self) -> set[int]:
        return {pid for main in child_pids(self.proc.pid) for pid in child_pids(main)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def submit(store, n: int, variants: int) -> list[str]:
    from genshop.briefs import parse_brief
    from genshop.service import submit_brief
    from genshop.settings import get_settings
    from workers.app import enqueue_generation

    ids = []
    for i in range(n):
        brief = parse_brief({"title": f"fault brief {i}", "variants": variants, "steps": 1, "width": 16, "height": 16,
                             "guidance_scale": 1.0, "seed": i, "client_reference": f"faults-{i}"})
        record, _ = submit_brief(store, brief, get_settings().preset)
        store.mark_enqueued(record.id, enqueue_generation(record.id))
        ids.append(record.id)
    return ids


def broker_lengths(client, queue: str) -> tuple[int, int]:
    """(messages waiting in the generate queue, messages delivered and not yet acknowledged)."""
    import redis

    try:
        return client.llen(queue), client.hlen("unacked")
    except redis.RedisError:
        return -1, -1


LOG_LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): [^\]]+\] (?:pool process (\d+) loaded its "
                      r"models|Process '[^']+' pid:(\d+) exited)", re.MULTILINE)


def log_time(day_time: str, millis: str) -> float:
    from datetime import datetime

    return datetime.strptime(day_time, "%Y-%m-%d %H:%M:%S").replace(microsecond=int(millis) * 1000).astimezone().timestamp()


def loaded_pids(worker: Worker) -> set[int]:
    """Pool processes of ``worker`` that logged "loaded its models" (so reported UP) and did not exit since."""
    loaded: set[int] = set()
    for m in LOG_LINE.finditer(worker.log.read_text(errors="replace")):
        (loaded.add if m.group(3) else loaded.discard)(int(m.group(3) or m.group(4)))
    return loaded


def loaded_again_after_kills(workers: list[Worker], kills: list[dict]) -> list[float | None]:
    """For each kill: seconds until its worker again has ``concurrency`` live pool processes
    that are done loading their models (each logs "loaded its models" right before it reports
    UP to the pool; a process killed while still loading never does). None: not within the run.
    Log times are the workers' local (here UTC) wall clock."""
    result: dict[int, float | None] = {}
    for index, worker in enumerate(workers):
        events = []  # (time, pid, loaded?)
        for m in LOG_LINE.finditer(worker.log.read_text(errors="replace")):
            events.append((log_time(m.group(1), m.group(2)), int(m.group(3) or m.group(4)), bool(m.group(3))))
        mine = [(n, k) for n, k in enumerate(kills) if k["worker"] == index]
        events += [(k["wall"], k["pid"], False) for _, k in mine]
        events.sort()
        for n, kill in mine:
            loaded: set[int] = set()
            result[n] = None
            for t, pid, is_loaded in events:
                (loaded.add if is_loaded else loaded.discard)(pid)
                if t >= kill["wall"] and len(loaded) >= worker.concurrency:
                    result[n] = t - kill["wall"]
                    break
    return [result[n] for n in range(len(kills))]


def replacement_loaded_after_kills(workers: list[Worker], kills: list[dict]) -> list[float]:
    """For each kill: seconds until a new process of its worker logged "loaded its models"
    (the first such line after the kill, each line used once): the killed slot refilled."""
    seconds = []
    for index, worker in enumerate(workers):
        events = sorted(log_time(m.group(1), m.group(2)) for m in LOG_LINE.finditer(worker.log.read_text(
            errors="replace")) if m.group(3))
        for kill in sorted((k for k in kills if k["worker"] == index), key=lambda k: k["wall"]):
            later = [t for t in events if t > kill["wall"]]
            if later:
                seconds.append(later[0] - kill["wall"])
                events.remove(later[0])
    return seconds


def load_durations(workers: list[Worker]) -> list[float]:
    """Every pool process's own "loaded its models in N s"."""
    return [float(m) for w in workers for m in re.findall(r"loaded its models in ([\d.]+)s", w.log.read_text(
        errors="replace"))]


def wait_for_loaded_pools(workers: list[Worker], kills: list[dict], timeout: float = 90) -> None:
    """After the last brief, give replacements still loading the time to finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and None in loaded_again_after_kills(workers, kills):
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--briefs", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between pool process kills")
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--requeue-after", type=int, default=5, help="GENSHOP_REQUEUE_AFTER of the workers")
    parser.add_argument("--timeout", type=float, default=1500, help="give up after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    home = Path(tempfile.mkdtemp(prefix="genshop-faults-"))
    redis_server = PrivateRedis(home)
    redis_server.start()
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    os.environ.update(
        GENSHOP_HOME=str(home), GENSHOP_PRESET="tiny-random", GENSHOP_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/0",
        GENSHOP_QUEUE=queue, GENSHOP_ENRICH_QUEUE=f"{queue}-enrich", GENSHOP_SCORE_QUEUE=f"{queue}-score",
        GENSHOP_EMBEDDING_MODEL="off", GENSHOP_REWARD_MODEL="off", GENSHOP_HARD_TIME_LIMIT="30",
        GENSHOP_VISIBILITY_TIMEOUT="40", GENSHOP_REQUEUE_AFTER=str(args.requeue_after),
        GENSHOP_TORCH_THREADS=os.environ.get("GENSHOP_TORCH_THREADS", "1"), PYTHONUNBUFFERED="1")
    os.environ.setdefault("GENSHOP_MODELS", str(Path(tempfile.gettempdir()) / "genshop-bench-models"))
    import redis
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import func, select

    from genshop.pipelines import ensure_weights
    from genshop.presets import load_preset
    from genshop.store import ItemRow, open_store

    console = Console(width=130)
    ensure_weights(load_preset("tiny-random"))  # build the random weights once, before the workers race to
    store = open_store()
    client = redis.Redis(port=redis_server.port)
    started = time.monotonic()
    submit(store, args.briefs, args.variants)
    console.print(f"submitted {args.briefs} briefs in {time.monotonic() - started:.1f}s; home {home}")

    workers = [Worker(f"faults{n}-{uuid.uuid4().hex[:4]}", args.concurrency, home / f"worker-{n}.log")
               for n in range(args.workers)]
    samples: list[tuple[float, list[int], int, int]] = []  # (t, pool sizes, queued, succeeded)
    kills: list[dict] = []  # {t, worker, pid, back_at}
    restarts_at = [(k + 1) / (args.redis_restarts + 1) for k in range(args.redis_restarts)]  # fractions done
    redis_restart_times: list[float] = []
    peak_queue = 0
    t0 = time.monotonic()
    next_kill = t0 + max(args.kill_every, 15.0)  # let the pools come up first
    finished = False
    try:
        while time.monotonic() - t0 < args.timeout:
            now = time.monotonic()
            pools = [w.pool() for w in workers]
            queued, unacked = broker_lengths(client, queue)
            done = store.count_briefs("succeeded") + store.count_briefs("failed") + store.count_briefs("cancelled")
            peak_queue = max(peak_queue, queued)
            samples.append((now - t0, [len(p) for p in pools], queued, done))
            for kill in kills:
                w = workers[kill["worker"]]
                if kill["back_at"] is None and len(pools[kill["worker"]]) == w.concurrency \
                        and kill["pid"] not in pools[kill["worker"]]:
                    kill["back_at"] = now - t0
            if done >= args.briefs and queued == 0:
                finished = True
                break
            if restarts_at and done >= restarts_at[0] * args.briefs:
                restarts_at.pop(0)
                redis_server.kill_and_restart()
                redis_restart_times.append(time.monotonic() - t0)
                console.print(f"[{time.monotonic() - t0:6.1f}s] redis SIGKILLed and restarted ({done} briefs done)")
            elif now >= next_kill:
                index = rng.randrange(len(workers))
                ready = pools[index] & loaded_pids(workers[index])  # up and serving, most likely mid-brief
                if ready:
                    victim = rng.choice(sorted(ready))
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills.append({"t": now - t0, "wall": time.time(), "worker": index, "pid": victim,
                                      "back_at": None})
                    except ProcessLookupError:
                        pass
                next_kill = now + args.kill_every
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        # stragglers: let a message restored after the visibility timeout be consumed
        drain_deadline = time.monotonic() + 60
        while time.monotonic() < drain_deadline and sum(broker_lengths(client, queue)) > 0:
            time.sleep(0.5)
        left_queued, left_unacked = broker_lengths(client, queue)
        wait_for_loaded_pools(workers, kills)
    finally:
        for w in workers:
            w.stop()
        redis_server.stop()

    logs = "\n".join(w.log.read_text(errors="replace") for w in workers)
    requeued = [b for m in re.finditer(r"requeued \d+ stale brief\(s\): (.+)", logs) for b in m.group(1).split(", ")]
    died = set(re.findall(r"brief (\w+): pool process \d+ died running it", logs))
    up_timeouts = logs.count("Timed out waiting for UP")
    briefs = store.list_briefs()
    by_status = {s: sum(1 for b in briefs if b.status == s) for s in ("succeeded", "failed", "running", "queued")}
    with store.sessions() as session:
        rows = session.scalar(select(func.count()).select_from(ItemRow)) or 0
        distinct = session.execute(select(ItemRow.brief_id, ItemRow.variant).distinct()).all()
    extra_runs = sum(max(0, b.attempts - 1) for b in briefs)
    pngs = {p.relative_to(home).as_posix() for p in (home / "images").rglob("*.png")}
    referenced = {i.image_path for b in briefs for i in store.list_items(b.id)} if len(briefs) <= 5000 else pngs
    recoveries = [k["back_at"] - k["t"] for k in kills if k["back_at"] is not None]
    never_back = sum(1 for k in kills if k["back_at"] is None)
    reloads = loaded_again_after_kills(workers, kills)
    loaded = [r for r in reloads if r is not None]
    refilled = replacement_loaded_after_kills(workers, kills)
    loads = load_durations(workers)

    table = Table(title=f"bench/faults.py — {args.briefs} briefs × {args.variants} variant, {args.workers} workers × "
                        f"{args.concurrency} processes, kill every {args.kill_every:g}s, {len(redis_restart_times)} "
                        f"Redis restarts, REQUEUE_AFTER={args.requeue_after}s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    expected_items = args.briefs * args.variants
    table.add_row("briefs expected / succeeded", f"{args.briefs} / {by_status['succeeded']}", "equal")
    table.add_row("briefs lost (failed, running or queued at the end)",
                  f"{args.briefs - by_status['succeeded']} ({by_status['failed']} / {by_status['running']} / "
                  f"{by_status['queued']})", "0")
    table.add_row("items expected / stored", f"{expected_items} / {rows}", "equal")
    table.add_row("items duplicated (rows beyond one per brief and variant)", str(rows - len(distinct)), "0")
    table.add_row("items lost", str(expected_items - len(distinct)), "0")
    table.add_row("PNG files without an item row / rows without a file",
                  f"{len(pngs - referenced)} / {len(referenced - pngs)}", "0 / 0")
    table.add_row("pool processes SIGKILLed", str(len(kills)), "")
    table.add_row("briefs whose pool process died running them", str(len(died)), "")
    table.add_row("extra runs (attempts beyond the first, all briefs)", str(extra_runs), f"<= {len(died)}")
    table.add_row("requeues by the sweep (all workers)", f"{len(requeued)} ({len(set(requeued))} briefs)",
                  f"<= {len(died)}")
    table.add_row("peak generate queue length", str(peak_queue), f"<= {args.briefs}")
    table.add_row("messages left at the end (queued / unacked)", f"{left_queued} / {left_unacked}", "0 / 0")
    table.add_row("'Timed out waiting for UP' (replacements killed)", str(up_timeouts), "0")
    if recoveries:
        table.add_row("pool full again after a kill: p50 / max (s)",
                      f"{statistics.median(recoveries):.1f} / {max(recoveries):.1f}", f"max <= {POOL_FULL_TARGET_S:g}")
    if loads:
        table.add_row("a pool process's model load (its own log): p50 / max (s)",
                      f"{statistics.median(loads):.1f} / {max(loads):.1f}", "")
    if refilled:
        table.add_row("killed slot refilled: replacement done loading, after its kill: p50 / max (s)",
                      f"{statistics.median(refilled):.1f} / {max(refilled):.1f}", f"max <= {POOL_FULL_TARGET_S:g}")
    if loaded:
        table.add_row("every process of the pool done loading again, after a kill (overlapping kills "
                      "add up): p50 / max (s)", f"{statistics.median(loaded):.1f} / {max(loaded):.1f}", "")
    table.add_row("kills after which the pool never got full again (processes / loaded)",
                  f"{never_back} / {len(kills) - len(loaded)}", "0 / 0")
    table.add_row("wall time to finish every brief (s)", f"{elapsed:.0f}" if finished else f"> {elapsed:.0f}", "")
    console.print(table)

    timeline = Table(title="pool size over time (min–max per 10 s window, per worker) · queue length · briefs done")
    timeline.add_column("t (s)", justify="right")
    for n in range(args.workers):
        timeline.add_column(f"worker {n} pool", justify="right")
    timeline.add_column("kills", justify="right")
    timeline.add_column("queue", justify="right")
    timeline.add_column("done", justify="right")
    window = 10.0
    for start in range(0, int(samples[-1][0]) + 1, int(window)):
        chunk = [s for s in samples if start <= s[0] < start + window]
        if not chunk:
            continue
        cells = [f"{min(s[1][n] for s in chunk)}–{max(s[1][n] for s in chunk)}" for n in range(args.workers)]
        n_kills = sum(1 for k in kills if start <= k["t"] < start + window)
        restarts = sum(1 for t in redis_restart_times if start <= t < start + window)
        timeline.add_row(str(start), *cells, f"{n_kills}" + (" +redis" * restarts), str(max(s[2] for s in chunk)),
                         str(chunk[-1][3]))
    console.print(timeline)
    ok = (by_status["succeeded"] == args.briefs and rows == len(distinct) == expected_items
          and len(requeued) <= len(died) and never_back == 0 and up_timeouts == 0
          and (not recoveries or max(recoveries) <= POOL_FULL_TARGET_S) and left_queued == 0
          and len(loaded) == len(refilled) == len(kills) and (not refilled or max(refilled) <= POOL_FULL_TARGET_S))
    console.print("targets met" if ok else "[bold red]targets NOT met[/]")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
