"""Queue control: a brief's place in the generation queue, pausing, resuming and clearing.

Priority uses Celery's priorities on Redis, not a queue system of our own. kombu's Redis
transport keeps one list per priority step (``broker_transport_options["priority_steps"]``,
here all ten, 0..9) and a worker's BRPOP names them in step order, so a message at a lower
number is always served first; within one step the list is first in, first out.

Fairness among designers comes from what the number means: the steps are two bands,
``high`` (0..4, ``priority: high`` / ``--front``) before ``normal`` (5..9), and inside its band
a brief goes at its place in its designer's line: the designer's first queued brief of that
band at the band's first step, their second one step later, and so on (the fifth and later
share the band's last step). So one designer's ten briefs take steps 5, 6, 7, 8, 9, 9, ...
and another designer's single brief, submitted after them, goes at step 5: it runs second,
not eleventh. The place is counted when the brief is put on the queue (submit, resume, the
requeue sweep); CLI briefs (no designer) are one line of their own.

Pausing is the store's (``Store.pause_queue``): covered queued briefs become ``paused``,
their messages are withdrawn from Redis (``withdraw``, best effort: a worker handed one that
was missed starts nothing, ``Store.start_attempt``), and briefs submitted meanwhile are stored
as paused, never enqueued. Resuming queues each paused brief again with one new message. A
paused brief is never lost (it is in the store, which the sweep and resume read) and never run
twice (at most one message is live for it, and the lease guards the rest).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from genshop.store import ALL_SCOPE, QUEUE_RANKS, BriefRecord, Store

PRIORITY_STEPS = list(range(10))  # kombu's Redis transport: 0 is served first, 9 last
BAND_START = {"high": 0, "normal": QUEUE_RANKS}

Enqueue = Callable[[str, int], str]  # (brief id, priority) -> task id
Withdraw = Callable[[list[str]], int]  # brief ids -> messages removed from the broker


def queue_priority(priority: str, place: int) -> int:
    """The Celery priority of a brief of ``priority`` at ``place`` in its designer's line."""
    return BAND_START[priority] + min(place, QUEUE_RANKS - 1)


def brief_priority(store: Store, record: BriefRecord) -> int:
    return queue_priority(record.brief.priority, store.queue_place(record))


def enqueue_waiting(store: Store, records: list[BriefRecord], enqueue: Enqueue) -> list[str]:
    """Put queued briefs on the queue, oldest first, each at its priority; returns their ids."""
    sent = []
    for record in records:
        store.mark_enqueued(record.id, enqueue(record.id, brief_priority(store, record)))
        sent.append(record.id)
    return sent


class QueueState(BaseModel):
    """The pauses in force and a designer's waiting briefs (``genshop queue status``, ``GET /api/queue``)."""

    paused_all: bool
    paused_designers: list[str]
    queued: int
    paused: int


def queue_state(store: Store, designer: str | None = None) -> QueueState:
    """With a ``designer``, only their own pause and briefs are reported (the API's view)."""
    scopes = store.queue_pauses()
    designers = [scope.removeprefix("designer:") for scope in scopes if scope != ALL_SCOPE]
    if designer is not None:
        designers = [d for d in designers if d == designer]
    return QueueState(paused_all=ALL_SCOPE in scopes, paused_designers=designers,
                      queued=store.count_briefs("queued", designer), paused=store.count_briefs("paused", designer))


def pause(store: Store, designer: str | None, withdraw: Withdraw) -> list[str]:
    """Pause the whole queue (``designer`` None) or one designer's briefs; returns the briefs paused."""
    paused = [record.id for record in store.pause_queue(designer)]
    if paused:
        try:
            withdraw(paused)
        except Exception:  # noqa: BLE001 - a message left behind starts nothing; the pause is recorded
            pass
    return paused


def resume(store: Store, designer: str | None, enqueue: Enqueue, check_queue: Callable[[], None]) -> list[str]:
    """End a pause and queue its briefs again (``check_queue`` first: a broker that is down
    changes nothing). A brief whose message cannot be sent after all stays queued in the
    store, and the requeue sweep sends it."""
    check_queue()
    return enqueue_waiting(store, store.resume_queue(designer), enqueue)


def clear(store: Store, designer: str | None, withdraw: Withdraw) -> list[str]:
    """Cancel a designer's queued and paused briefs in one call; returns them."""
    cleared = [record.id for record in store.clear_queue(designer)]
    if cleared:
        try:
            withdraw(cleared)
        except Exception:  # noqa: BLE001 - a worker given a message of a cancelled brief discards it
            pass
    return cleared

