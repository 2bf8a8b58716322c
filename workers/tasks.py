"""Celery tasks: load from the store, call the part, write to the store. Nothing else.

The diffusion pipeline is loaded once per worker process, in ``worker_process_init``
(after the prefork pool forked, never in the parent), and kept for every task that
process runs. The parent runs the requeue sweep (``genshop.service.requeue_stale``).
"""

from __future__ import annotations

import os
import threading
import time

import torch
from celery import signals
from celery.exceptions import Ignore
from celery.utils.log import get_logger

from genshop.pipelines import LoadedPipeline, load_pipeline
from genshop.service import Progress, requeue_stale, run_brief
from genshop.settings import get_settings
from genshop.store import Store, open_store
from workers.app import GENERATE_TASK, app, enqueue_generation

logger = get_logger("genshop.workers")

_pipeline: LoadedPipeline | None = None
_store: Store | None = None
pipeline_loads = 0


def worker_pipeline() -> LoadedPipeline:
    global _pipeline, pipeline_loads
    if _pipeline is None:
        threads = int(os.environ.get("GENSHOP_TORCH_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        _pipeline = load_pipeline(get_settings().preset)
        pipeline_loads += 1
    return _pipeline


def worker_store() -> Store:
    global _store
    if _store is None:
        _store = open_store()
    return _store


@signals.worker_process_init.connect
def _load_models_in_child(**_kwargs) -> None:
    worker_store()
    worker_pipeline()


@signals.worker_ready.connect
def _start_requeue_sweeper(**_kwargs) -> None:
    """In the worker's main process: every few seconds, requeue briefs the broker lost."""
    settings = get_settings()
    interval = max(1.0, min(60.0, settings.requeue_after / 6))

    def sweep_forever() -> None:
        store = open_store()
        while True:
            time.sleep(interval)
            try:
                requeued = requeue_stale(store, enqueue_generation, settings.requeue_after)
                if requeued:
                    logger.warning("requeued %d stale brief(s): %s", len(requeued), ", ".join(requeued))
            except Exception:  # noqa: BLE001 - a broker or database blip: try again next round
                logger.exception("requeue sweep failed")

    threading.Thread(target=sweep_forever, name="genshop-requeue", daemon=True).start()


@app.task(bind=True, name=GENERATE_TASK)
def generate_brief(self, brief_id: str) -> dict:
    def on_progress(progress: Progress) -> None:
        try:  # best effort: the store holds the same progress, and a broker blip must not fail the brief
            self.update_state(state="RUNNING", meta={"brief_id": brief_id, **progress.model_dump()})
        except Exception:  # noqa: BLE001
            pass

    record = run_brief(worker_store(), brief_id, worker_pipeline(), get_settings().max_attempts, on_progress)
    result = {"brief_id": brief_id, "status": record.status, "worker_pid": os.getpid(), "pipeline_loads": pipeline_loads}
    if record.status == "cancelled":
        self.backend.mark_as_revoked(self.request.id, reason="cancelled by request", request=self.request)
        raise Ignore()
    if record.status == "failed":
        raise RuntimeError(record.error)
    return result
