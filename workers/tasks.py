"""Celery tasks: load from the store, call the part, write to the store. Nothing else.

The diffusion pipeline (for the generate queue), the reward model (for the score queue)
and the enricher (CLIP, taxonomy, classifier; for the enrich queue) are loaded once per
worker process, in ``worker_process_init`` (after the prefork pool forked, never in the
parent), and kept for every task that process runs. A generated brief is queued for
enrichment (when an embedding model is configured) and, with target groups, for scoring,
once per brief. The parent runs the requeue sweep (``genshop.service.requeue_stale``) and
releases the leases of the briefs whose pool process died (``GenerationRequest``).

Each task gathers (``workers.batching``): a message that waited with others while the pool
was busy may reach its task with ``companions``, the briefs of those other messages, and the
task does their work too (``run_briefs``, ``score_briefs``, ``enrich_briefs``); their own
messages follow and find it done.
"""

from __future__ import annotations

import os
import threading
import time

import torch
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import Ignore, TimeLimitExceeded
from celery.utils.log import get_logger

from genshop.pipelines import LoadedPipeline, load_pipeline
from genshop.service import Progress, requeue_stale, run_brief, run_briefs
from genshop.settings import get_settings
from genshop.store import BriefRecord, Store, open_store
from workers.app import (ENRICH_TASK, GENERATE_TASK, SCORE_TASK, app, enqueue_enrichment, enqueue_generation,
                         enqueue_scoring, generation_messages)
from workers.batching import GatheredRequest, companion_task_ids, companions_of, gathered

logger = get_logger("genshop.workers")

_pipeline: LoadedPipeline | None = None
_scorer = None
_enricher = None
_store: Store | None = None
pipeline_loads = 0


def _set_threads() -> None:
    threads = int(os.environ.get("GENSHOP_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)


def worker_pipeline() -> LoadedPipeline:
    global _pipeline, pipeline_loads
    if _pipeline is None:
        _set_threads()
        _pipeline = load_pipeline(get_settings().preset)
        pipeline_loads += 1
    return _pipeline


def worker_scorer():
    """The reward model and its embedder, loaded once per process (``reward`` imported only here)."""
    global _scorer
    if _scorer is None:
        from reward.brief_scoring import load_brief_scorer

        _set_threads()
        _scorer = load_brief_scorer(get_settings().reward_model)
    return _scorer


def worker_enricher():
    global _enricher
    if _enricher is None:
        from genshop.enrichment import enrich_config_from_settings, load_enricher

        _set_threads()
        _enricher = load_enricher(enrich_config_from_settings(get_settings()))
    return _enricher


def worker_store() -> Store:
    global _store
    if _store is None:
        _store = open_store()
    return _store


def consumed_queues() -> set[str]:
    """The queues this worker serves (``genshop worker --queues``); every queue when not told."""
    settings = get_settings()
    named = os.environ.get("GENSHOP_WORKER_QUEUES", "")
    return set(named.split(",") if named else settings.worker_queues)


@signals.worker_init.connect
def _import_model_code_in_main(**_kwargs) -> None:
    """Import the model *code* (diffusers' pipeline class, transformers' text encoder, the
    reward and enrich modules) once in the main process, before the pool forks: every pool
    process, a killed one's replacement too, inherits it and only loads weights (well under
    a second on tiny-random, not the 5 s to 40 s that importing diffusers takes on a busy CPU).
    No weights, no CUDA state: that stays in ``worker_process_init``, after the fork."""
    settings = get_settings()
    try:
        if settings.queue in consumed_queues():
            import diffusers
            from transformers import CLIPTextModel  # noqa: F401

            from genshop.presets import load_preset

            getattr(diffusers, load_preset(settings.preset).pipeline_class)
        if settings.score_queue in consumed_queues() and settings.reward_model:
            import reward.brief_scoring  # noqa: F401
        if settings.enrich_queue in consumed_queues() and settings.embedding_model:
            import genshop.enrichment  # noqa: F401
    except Exception:  # noqa: BLE001 - only a head start: each pool process imports (and reports) what it needs
        logger.exception("could not import the model code ahead of the pool")


@signals.worker_process_init.connect
def _load_models_in_child(**_kwargs) -> None:
    """Load what this worker's queues need: a scoring-only worker never loads the diffusion pipeline.
    (Celery waits ``GENSHOP_PROCESS_START_TIMEOUT`` for this before it kills the process.)"""
    if _main is not None:  # the main process's engine, inherited by fork: never use its connections here
        _main.engine.dispose(close=False)
    started = time.monotonic()
    settings = get_settings()
    worker_store()
    if settings.queue in consumed_queues():
        worker_pipeline()
    if settings.score_queue in consumed_queues() and settings.reward_model:
        worker_scorer()
    if settings.enrich_queue in consumed_queues() and settings.embedding_model:
        worker_enricher()
    logger.info("pool process %d loaded its models in %.1fs", os.getpid(), time.monotonic() - started)


_main: Store | None = None
_main_lock = threading.Lock()


def main_store() -> Store:
    """The store of the worker's main process (the sweeper, lease releases); opened on first
    use, and again on the next call if opening failed (the database was down)."""
    global _main
    with _main_lock:
        if _main is None:
            _main = open_store()
        return _main


def lease_owner(hostname: str, pid: int) -> str:
    """The name a pool process holds a brief's lease under: the node and the process id,
    known both to the process and to the worker's main process that sees it die."""
    return f"{hostname}:{pid}"


class GenerationRequest(GatheredRequest):
    """The main process's side of a generation task: when the pool process running it dies
    (SIGKILL, OOM), release the leases of the briefs it ran (its own and its companions')
    *before* Celery requeues the message, so the redelivery runs the brief at once instead of
    finding it held by the dead."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        if isinstance(exc, (WorkerLostError, TimeLimitExceeded, SystemExit, KeyboardInterrupt)) and self.worker_pid:
            brief_id = (self.args or [None])[0]
            try:
                released = main_store().release_leases_of(lease_owner(self.hostname, self.worker_pid))
                if released:
                    logger.warning("brief %s: pool process %s died running it (%s); lease released for %s",
                                   brief_id, self.worker_pid, type(exc).__name__, ", ".join(released))
            except Exception:  # noqa: BLE001 - the lease lapses by itself; the redelivery or the sweep takes it then
                logger.exception("could not release the lease of brief %s", brief_id)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


@signals.worker_ready.connect
def _start_requeue_sweeper(**_kwargs) -> None:
    """In the worker's main process: every few seconds, requeue briefs the broker lost."""
    settings = get_settings()
    interval = max(1.0, min(60.0, settings.requeue_after / 6))

    def sweep_forever() -> None:
        while True:
            time.sleep(interval)
            try:  # the store is opened in here too: a database down at worker start must not end the sweeps
                requeued = requeue_stale(main_store(), enqueue_generation, settings.requeue_after,
                                         generation_messages, settings.lease_timeout)
                if requeued:
                    logger.warning("requeued %d stale brief(s): %s", len(requeued), ", ".join(requeued))
            except Exception:  # noqa: BLE001 - a broker or database blip: try again next round
                logger.exception("requeue sweep failed")

    threading.Thread(target=sweep_forever, name="genshop-requeue", daemon=True).start()


def send_followups(records: list[BriefRecord]) -> dict[str, dict]:
    """Queue enrich (when an embedding model is configured) and score (a brief with target
    groups, when a reward model is) for each succeeded brief of ``records``. Returns brief id →
    the follow-up task ids sent for it; the caller records them as queued."""
    settings = get_settings()
    sent: dict[str, dict] = {}
    for record in (r for r in records if r.status == "succeeded"):
        tasks = {}
        if settings.embedding_model:
            tasks["enrich_task_id"] = enqueue_enrichment(record.id)
        if record.brief.groups and settings.reward_model:
            tasks["score_task_id"] = enqueue_scoring(record.id)
        if tasks:
            sent[record.id] = tasks
    return sent


def queue_followups(store: Store, records: list[BriefRecord]) -> dict[str, dict]:
    """``send_followups`` for succeeded briefs this delivery did not finish (a redelivered message,
    a companion whose leader died), once each: those recorded as queued before get nothing
    again (one read, one write for all of them)."""
    settings = get_settings()
    wanted = [r for r in records if r.status == "succeeded"
              and (settings.embedding_model or (r.brief.groups and settings.reward_model))]
    if not wanted:
        return {}
    queued = store.followups_queued_among([r.id for r in wanted])
    sent = send_followups([r for r in wanted if r.id not in queued])
    store.mark_followups_queued(list(sent))
    return sent


def generation_result(record: BriefRecord, followups: dict) -> dict:
    return {"brief_id": record.id, "status": record.status, "worker_pid": os.getpid(),
            "pipeline_loads": pipeline_loads, **followups}


def settle_companion(backend, task_id: str, record: BriefRecord, followups: dict) -> None:
    """Store the result a companion's own pool job would have stored for its finished brief, so
    the worker's main process acknowledges its message without one (``workers.batching``). A
    brief not finished (another delivery runs it, a pause covers it) is left to that job."""
    if record.status == "succeeded":
        backend.mark_as_done(task_id, generation_result(record, followups))
    elif record.status == "cancelled":
        backend.mark_as_revoked(task_id, reason="cancelled by request")
    elif record.status == "failed":
        backend.mark_as_failure(task_id, RuntimeError(record.error))


@app.task(bind=True, name=GENERATE_TASK, Request=GenerationRequest, Strategy="workers.batching:gathering",
          settles_companions=True)
def generate_brief(self, brief_id: str) -> dict:
    companions = dict(zip(companions_of(self.request), companion_task_ids(self.request)))  # brief id → task id

    def on_progress(progress_of: str, progress: Progress) -> None:
        try:  # best effort: the store holds the same progress, and a broker blip must not fail the brief
            task_id = self.request.id if progress_of == brief_id else companions[progress_of]
            self.update_state(task_id=task_id, state="RUNNING",
                              meta={"brief_id": progress_of, **progress.model_dump()})
        except Exception:  # noqa: BLE001
            pass

    followups: dict[str, dict] = {}  # brief id → the follow-up task ids sent for it

    def send(records: list[BriefRecord]) -> list[str]:  # for the briefs this delivery finished
        followups.update(send_followups(records))
        return list(followups)

    settings = get_settings()
    store = worker_store()
    owner = lease_owner(self.request.hostname, os.getpid())
    if gathered(self.request) and (done := store.get_brief(brief_id)).is_terminal:
        records = {brief_id: done}  # its leader finished it: one read, no lease
    elif companions:  # the worker's main process settles their messages from the results stored here
        records = run_briefs(store, [brief_id, *companions], worker_pipeline(), settings.max_attempts, on_progress,
                             owner=owner, lease_s=settings.lease_timeout, followups=send)
        records.setdefault(brief_id, store.get_brief(brief_id))
    else:
        records = {brief_id: run_brief(store, brief_id, worker_pipeline(), settings.max_attempts,
                                       lambda progress: on_progress(brief_id, progress), owner=owner,
                                       lease_s=settings.lease_timeout, followups=send)}
    followups.update(queue_followups(store, [r for r in records.values() if r.id not in followups]))
    for companion, task_id in companions.items():
        if companion in records:
            settle_companion(self.backend, task_id, records[companion], followups.get(companion, {}))
    record = records[brief_id]
    if record.status == "running":  # a duplicate message: another delivery holds the lease and runs the brief
        raise Ignore()  # acknowledged, and the running delivery's task state is left to it
    if record.status == "paused":  # a pause covers it: resuming the queue sends it a new message
        raise Ignore()
    if record.status == "cancelled":
        self.backend.mark_as_revoked(self.request.id, reason="cancelled by request", request=self.request)
        raise Ignore()
    if record.status == "failed":
        raise RuntimeError(record.error)
    return generation_result(record, followups.get(brief_id, {}))


def together_or_alone(run, brief_id: str, companions: list[str]):
    """``run(brief_ids)[brief_id]`` over the brief and its companions; if the group fails (one
    brief's unreadable image, say), the brief alone: each companion's own message follows and
    does the same for itself, so one bad brief fails only itself."""
    if companions:
        try:
            return run([brief_id, *companions])[brief_id]
        except Exception:  # noqa: BLE001 - logged; the brief is retried alone right here
            logger.exception("brief %s: the group of %d failed; running it alone", brief_id, 1 + len(companions))
    return run([brief_id])[brief_id]


@app.task(bind=True, name=SCORE_TASK, Request=GatheredRequest, Strategy="workers.batching:gathering")
def score_brief(self, brief_id: str) -> dict:
    from reward.brief_scoring import score_briefs

    scores = together_or_alone(lambda ids: score_briefs(worker_store(), ids, worker_scorer()), brief_id,
                               companions_of(self.request))
    return {"brief_id": brief_id, "scores": len(scores), "worker_pid": os.getpid()}


@app.task(bind=True, name=ENRICH_TASK, Request=GatheredRequest, Strategy="workers.batching:gathering")
def enrich_brief(self, brief_id: str) -> dict:
    from genshop.enrichment import enrich_briefs

    understood = together_or_alone(lambda ids: enrich_briefs(worker_store(), ids, worker_enricher()), brief_id,
                                   companions_of(self.request))
    duplicates = sum(1 for u in understood if u.near_duplicate_of)
    return {"brief_id": brief_id, "items": len(understood), "near_duplicates": duplicates, "worker_pid": os.getpid()}
