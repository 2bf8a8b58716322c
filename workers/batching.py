"""Gathering messages of one task into one pool job: a Celery task ``Strategy``.

A task's Strategy is how the worker's main process handles that task's messages as they
arrive (Celery's default hands each one to the pool at once). ``gathering`` wraps the
default, so every message is still received, reserved, acknowledged late, rejected on a lost
worker, logged and given its result by its own Celery ``Request``; it only changes when a
request goes to the pool:

- while every pool process is busy with a group, arriving requests gather (they would wait
  for a process anyway); when one is free, the waiting requests go as one group of at most
  ``GENSHOP_GATHER_MAX``, at once, or, with ``GENSHOP_GATHER_WINDOW_MS``, once the first has
  waited that long for company (or the group is full): a backlog is batched without anyone
  waiting, and a lone request waits at most the window;
- the waiting requests are kept in their messages' priority order (the Celery priority each
  was sent at, ``genshop.queueing``: lower first; first come, first served within one), so a
  group is always the highest-priority requests the worker holds: a ``high`` brief that
  arrives behind prefetched ``normal`` ones leads the next group, and each designer's briefs,
  spread over their band's steps, take their turns inside and across groups as on the queue;
- a group goes to the pool as its first request (the leader) with the others' first
  arguments (brief ids) in the leader's request as ``companions``: the leader's task does the
  work of all of them together (one pipeline call, one CLIP forward);
- the others are held until the leader's message is acknowledged or rejected. A task with
  ``settles_companions`` stores each companion's result itself (the leader's process wrote its
  brief's state): the main process reads those results back (one ``MGET``) and acknowledges,
  marks ready and logs each companion whose result is there, with no pool job. Every other
  companion (its result not stored: the leader's process died, or another delivery runs its
  brief) goes to the pool as usual and finds its brief done, or runs it itself; each message
  keeps its own result, ack and log line.

The worker prefetches enough messages to fill a group while one runs (``workers.app``): a
message still in Redis when a higher one is waiting there is fetched as the running group's
messages are acknowledged, so a ``high`` brief waits for at most the running group and the
one formed as it ends. With
``GENSHOP_GATHER_MAX=1`` the task runs with Celery's default strategy, one message at a time.
"""

from __future__ import annotations

import bisect
import itertools
import time

from celery import states
from celery.app.trace import LOG_SUCCESS
from celery.utils.log import get_logger
from celery.worker.request import Request
from celery.worker.state import task_ready
from celery.worker.strategy import default

logger = get_logger("celery.app.trace")  # the logger of the pool's own "Task ...[id] succeeded" lines

COMPANIONS = "companions"  # the leader's request field: the first argument of every other request of its group
COMPANION_IDS = "companion_ids"  # the leader's request field: their task ids, in the same order
LEADER = "gathered_by"  # a companion's request field: the task id of the leader that did its work


def priority_of(request: Request) -> int:
    """The Celery priority the request's message was sent at (kombu's Redis transport serves
    lower first, and puts a message sent without one at 0)."""
    priority = (request.delivery_info or {}).get("priority")
    return 0 if priority is None else int(priority)


class Gatherer:
    """The groups of one task in one worker's main process (runs on its event loop: no locks)."""

    def __init__(self, handle, timer, processes: int, window_s: float, max_size: int, settle=None):
        self.handle, self.timer, self.processes, self.settle = handle, timer, max(1, processes), settle
        self.window_s, self.max_size = window_s, max_size
        self.waiting: list[tuple[int, int, float, Request]] = []  # (priority, arrival number, arrived at, request)
        self._arrivals = itertools.count()
        self.held: dict[str, list[Request]] = {}  # leader's task id → the requests it does the work of
        self.leaders: set[str] = set()
        self._timer_entry = None

    def receive(self, request: Request) -> None:
        bisect.insort(self.waiting, (priority_of(request), next(self._arrivals), time.monotonic(), request))
        self.flush()

    def flush(self) -> None:
        while self.waiting and len(self.leaders) < self.processes:
            waited = time.monotonic() - min(arrived for _, _, arrived, _ in self.waiting)  # the longest wait
            if len(self.waiting) < self.max_size and waited < self.window_s:
                self._wake_in(self.window_s - waited)
                return
            group = [request for *_, request in self.waiting[:self.max_size]]
            del self.waiting[:self.max_size]
            self._send(group)

    def _send(self, group: list[Request]) -> None:
        leader, companions = group[0], group[1:]
        if companions:
            leader._request_dict[COMPANIONS] = [request.args[0] for request in companions]
            leader._request_dict[COMPANION_IDS] = [request.id for request in companions]
            for companion in companions:
                companion._request_dict[LEADER] = leader.id
            self.held[leader.id] = companions
        self.leaders.add(leader.id)
        self.handle(leader)

    def finished(self, request: Request) -> None:
        """A request's message was acknowledged or rejected: a leader's companions go to the pool."""
        if request.id not in self.leaders:
            return
        self.leaders.discard(request.id)
        companions = self.held.pop(request.id, [])
        settled = self.settle(companions) if companions and self.settle else set()
        for companion in companions:
            if companion.id not in settled:
                self.handle(companion)
        self.flush()

    def _wake_in(self, seconds: float) -> None:
        if self._timer_entry is None:
            self._timer_entry = self.timer.call_after(max(0.0, seconds), self._on_timer)

    def _on_timer(self) -> None:
        self._timer_entry = None
        self.flush()


class _HandledBy:
    """The consumer as Celery's default strategy sees it, but with ``on_task_request`` (where a
    ready request goes) replaced."""

    def __init__(self, consumer, on_task_request):
        self._consumer, self.on_task_request = consumer, on_task_request

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def gathering(task, app, consumer, **kwargs):
    """The Strategy of a task whose requests are done in groups (``Task.Strategy``)."""
    from genshop.settings import get_settings

    settings = get_settings()
    if settings.gather_max <= 1:
        return default(task, app, consumer, **kwargs)
    gatherer = Gatherer(consumer.on_task_request, consumer.timer, getattr(consumer.pool, "limit", 1) or 1,
                        settings.gather_window_ms / 1000, settings.gather_max,
                        (lambda requests: settle_stored(task, requests)) if getattr(task, "settles_companions", False)
                        else None)
    task.gatherer = gatherer
    return default(task, app, _HandledBy(consumer, gatherer.receive), **kwargs)


def settle_stored(task, requests: list[Request]) -> set[str]:
    """In the main process: the requests whose result their leader stored (read back in one
    ``MGET`` from the Redis result backend), each marked ready, logged as the pool logs it and
    acknowledged; returns their task ids."""
    backend = task.backend
    stored = backend.client.mget([backend.get_key_for_task(request.id) for request in requests])
    settled = set()
    for request, raw in zip(requests, stored):
        meta = backend.decode_result(raw) if raw is not None else {}
        if meta.get("status") not in states.READY_STATES:
            continue
        task_ready(request, successful=meta["status"] == states.SUCCESS)
        if meta["status"] == states.SUCCESS:
            logger.info(LOG_SUCCESS, {"id": request.id, "name": request.name, "runtime": 0.0,
                                      "return_value": meta.get("result")})
        elif meta["status"] == states.FAILURE:
            logger.error("Task %s[%s] raised unexpected: %r", request.name, request.id, meta.get("result"))
        request.acknowledge()
        settled.add(request.id)
    return settled


class GatheredRequest(Request):
    """A request of a gathering task: tells the task's gatherer when its message is settled."""

    def _settled(self) -> None:
        gatherer = getattr(self._task, "gatherer", None)
        if gatherer is not None:
            gatherer.finished(self)

    def acknowledge(self):
        settled = not self.acknowledged
        super().acknowledge()
        if settled:
            self._settled()

    def reject(self, requeue=False):
        settled = not self.acknowledged
        super().reject(requeue)
        if settled:
            self._settled()


def companions_of(task_request) -> list[str]:
    """In the task: the first arguments of the requests whose work this one does too."""
    return list(getattr(task_request, COMPANIONS, None) or [])


def companion_task_ids(task_request) -> list[str]:
    """In the task: the task ids of those requests, in the order of ``companions_of``."""
    return list(getattr(task_request, COMPANION_IDS, None) or [])


def gathered(task_request) -> bool:
    """In the task: whether a leader did (or tried) this request's work before it."""
    return getattr(task_request, LEADER, None) is not None
