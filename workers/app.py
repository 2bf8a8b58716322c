"""The Celery app: Redis broker and result backend, JSON only, late acks.

Reliability settings, and why:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task is acknowledged only after it
  ran, so a worker killed mid-brief leaves the message to be delivered again.
- ``worker_prefetch_multiplier``: twice ``GENSHOP_GATHER_MAX`` per process, so a worker holds
  the next group while one runs (``workers.batching``: tasks done together, the held ones in
  their priority order; less would leave the next group short of a full one); 1 with
  ``GENSHOP_GATHER_MAX=1``, a worker then holds one brief at a time. Held messages are
  unacknowledged: those of a worker killed whole come back after the visibility timeout.
- ``visibility_timeout`` above the hard time limit: Redis redelivers unacked messages only
  after this long, so a task still running is never handed to a second worker, and a
  dead worker's task comes back once that time has passed (any live or restarted
  worker scans for such messages every few seconds). The Redis server must persist
  (AOF or RDB on shutdown) for queued briefs to survive a Redis restart.
- soft/hard time limits: the soft one raises inside the task (the brief is failed with
  the error); the hard one kills the process.
- ``priority_steps`` 0..9: one Redis list per Celery priority, served in that order
  (``genshop.queueing``: high before normal, each designer's briefs spread over the steps).
- ``worker_proc_alive_timeout`` (``GENSHOP_PROCESS_START_TIMEOUT``): a new pool process
  loads its models in ``worker_process_init`` before it reports UP; Celery's 4 s default is
  shorter than that, so every replacement of a killed process was killed in turn and the
  pool shrank for good.
"""

from __future__ import annotations

import json
from functools import cache

import redis
from celery import Celery

from genshop.queueing import PRIORITY_STEPS, queue_priority
from genshop.settings import get_settings

GENERATE_TASK = "genshop.generate_brief"
SCORE_TASK = "genshop.score_brief"
ENRICH_TASK = "genshop.enrich_brief"


def create_app() -> Celery:
    settings = get_settings()
    if settings.visibility_timeout <= settings.hard_time_limit:
        raise ValueError(
            f"GENSHOP_VISIBILITY_TIMEOUT ({settings.visibility_timeout}s) must exceed GENSHOP_HARD_TIME_LIMIT "
            f"({settings.hard_time_limit}s), or running tasks are redelivered to a second worker"
        )
    app = Celery("genshop", broker=settings.broker_url, backend=settings.result_backend, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=2 * settings.gather_max if settings.gather_max > 1 else 1,
        worker_proc_alive_timeout=float(settings.process_start_timeout),
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # scan for a dead worker's unacked messages this often (kombu's default is ~100 s)
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": PRIORITY_STEPS,  # every Celery priority its own list (kombu's default: 4 steps)
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        result_expires=7 * 24 * 3600,
        task_track_started=False,  # the task publishes its own RUNNING state with progress
        task_default_queue=settings.queue,
        task_routes={GENERATE_TASK: {"queue": settings.queue}, SCORE_TASK: {"queue": settings.score_queue},
                     ENRICH_TASK: {"queue": settings.enrich_queue}},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


app = create_app()


def check_broker() -> None:
    """Fail fast (a few hundred ms, not the result backend's long retries) when the broker is down."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=2, interval_start=0, interval_step=0.2, interval_max=0.2)


def enqueue_generation(brief_id: str, priority: int = queue_priority("normal", 0)) -> str:
    """Put a stored brief on the generation queue at a Celery ``priority`` (0 is served first,
    ``genshop.queueing``); the task id is derived from the brief."""
    task_id = generation_task_id(brief_id)
    app.send_task(GENERATE_TASK, args=[brief_id], task_id=task_id, queue=get_settings().queue, priority=priority)
    return task_id


def enqueue_new_brief(brief_id: str, priority: int = queue_priority("normal", 0)) -> str:
    """``enqueue_generation`` for a brief just submitted: a broker that is down fails at once."""
    check_broker()
    return enqueue_generation(brief_id, priority)


PRIORITY_SEPARATOR = "\x06\x16"  # kombu's Redis transport: queue "q" at priority p is the list "q\x06\x16p"
UNACKED_KEY = "unacked"  # kombu's hash of delivered, unacknowledged messages (restored after the visibility timeout)


@cache
def _broker_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def _generation_lists() -> list[str]:
    """The Redis lists of the generate queue, one per priority step (step 0 is the queue's own name)."""
    queue = get_settings().queue
    return [queue] + [f"{queue}{PRIORITY_SEPARATOR}{p}" for p in PRIORITY_STEPS[1:]]


def withdraw_generation_messages(brief_ids: list[str]) -> int:
    """Remove the briefs' waiting generation messages from Redis (a pause, a clear); returns how
    many. A message a worker has already taken is not touched: the store tells that worker not
    to run the brief."""
    wanted = {generation_task_id(brief_id) for brief_id in brief_ids}
    client, removed = _broker_client(get_settings().broker_url), 0
    for key in _generation_lists():
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            if isinstance(message, dict) and message.get("headers", {}).get("id") in wanted:
                removed += client.lrem(key, 1, raw)
    return removed


def generation_task_ids_in_broker() -> set[str]:
    """Ids of the generation tasks whose message Redis holds: waiting in the generate queue
    (any priority) or delivered to a worker and not yet acknowledged. Read in one MULTI, so
    a message moving from the queue to a worker is seen in one place or the other."""
    settings = get_settings()
    keys = _generation_lists()
    with _broker_client(settings.broker_url).pipeline(transaction=True) as pipe:
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals(UNACKED_KEY)
        *queued, unacked = pipe.execute()
    messages = [json.loads(raw) for waiting in queued for raw in waiting]
    messages += [json.loads(raw)[0] for raw in unacked]
    return {m.get("headers", {}).get("id") for m in messages if isinstance(m, dict)} - {None}


def generation_messages(brief_ids: list[str]) -> set[str]:
    """The briefs among ``brief_ids`` whose generation message the broker still holds."""
    held = generation_task_ids_in_broker()
    return {brief_id for brief_id in brief_ids if generation_task_id(brief_id) in held}


def generation_task_id(brief_id: str) -> str:
    return f"generate-{brief_id}"


def revoke_task(task_id: str) -> None:
    """Withdraw a queued task, best effort: the store's cancel flag already stops it."""
    try:
        app.control.revoke(task_id)
    except Exception:  # noqa: BLE001 - a broker hiccup must not fail a cancel that is already recorded
        pass


def enqueue_scoring(brief_id: str) -> str:
    """Put a generated brief on the scoring queue (CPU workers may serve it apart from the GPU ones)."""
    task_id = f"score-{brief_id}"
    app.send_task(SCORE_TASK, args=[brief_id], task_id=task_id, queue=get_settings().score_queue)
    return task_id


def enqueue_enrichment(brief_id: str) -> str:
    """Put a generated brief on the enrich queue (embedding, categories, attributes, near-duplicates, index)."""
    task_id = f"enrich-{brief_id}"
    app.send_task(ENRICH_TASK, args=[brief_id], task_id=task_id, queue=get_settings().enrich_queue)
    return task_id
