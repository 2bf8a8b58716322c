"""The brief lifecycle, one code path for every face: submit, run, cancel, read back.

The CLI, the Celery tasks and the in-process worker of ``genshop demo`` /
``submit --local`` all call these functions; a Celery task is a thin wrapper that
passes its own progress callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import BaseModel

from genshop.adapters import use_group
from genshop.briefs import Brief, resolve_brief
from genshop.generation import GenerationCancelled, generate_batch, plan_batches
from genshop.pipelines import LoadedPipeline
from genshop.presets import load_preset
from genshop.store import BriefRecord, ItemRecord, NewItem, Store


class Progress(BaseModel):
    variants_done: int
    variants_total: int
    step: int
    steps: int
    batch: int
    batches: int


ProgressCallback = Callable[[Progress], None]


class BriefWithItems(BaseModel):
    brief: BriefRecord
    items: list[ItemRecord]


def submit_brief(store: Store, brief: Brief, preset_name: str) -> tuple[BriefRecord, bool]:
    """Resolve the brief against the preset (raises ``BriefError``) and store it as queued.
    Returns (record, created); a known client reference returns the first brief."""
    if brief.client_reference and (existing := store.find_by_reference(brief.client_reference)):
        return existing, False
    return store.create_brief(resolve_brief(brief, load_preset(preset_name)), preset_name)


def run_brief(
    store: Store,
    brief_id: str,
    loaded: LoadedPipeline,
    max_attempts: int,
    on_progress: ProgressCallback | None = None,
    progress_interval_s: float = 0.25,
) -> BriefRecord:
    """Generate every variant the brief still lacks, then mark it finished.

    Progress goes to the store, and to ``on_progress``, at most every
    ``progress_interval_s`` and after every batch.

    Idempotent per brief and variant: variants already stored are skipped and inserts
    of existing (brief, variant) pairs are ignored, so a redelivered task completes the
    brief without duplicates. Cancellation is checked at every denoising step.
    """
    record = store.start_attempt(brief_id, max_attempts)
    if record.status != "running":
        return record
    brief = record.brief
    batches = plan_batches(brief, loaded.preset.defaults.batch_size, frozenset(loaded.adapters))
    done = store.existing_variants(brief_id)
    last_write = time.monotonic()  # the first progress report comes progress_interval_s in, or at a batch's end

    def report(progress: Progress, force: bool = False) -> None:
        nonlocal last_write
        now = time.monotonic()
        if force or now - last_write >= progress_interval_s:
            last_write = now
            store.update_progress(brief_id, progress.model_dump())
            if on_progress:
                on_progress(progress)

    try:
        for index, (adapter_group, variants) in enumerate(batches):
            if set(variants) <= done:
                continue
            use_group(loaded.pipeline, adapter_group, loaded.adapters)
            model_id, revision = loaded.identity(adapter_group)

            def on_step(step: int, steps: int, index=index) -> None:
                report(Progress(variants_done=len(done), variants_total=brief.variants, step=step, steps=steps,
                                batch=index + 1, batches=len(batches)))

            images = generate_batch(loaded, brief, variants, lambda: store.is_cancel_requested(brief_id), on_step)
            new_items = []
            for generated in images:
                if generated.variant in done:
                    continue
                sha, path = store.images.put(generated.image)
                new_items.append(NewItem(
                    brief_id=brief_id, variant=generated.variant, prompt=generated.prompt,
                    negative_prompt=generated.negative_prompt, seed=generated.seed, steps=brief.steps,
                    guidance_scale=brief.guidance_scale, width=brief.width, height=brief.height,
                    model_id=model_id, model_revision=revision, image_sha256=sha, image_path=path,
                    timings=generated.timings,
                ))
            store.add_items(new_items)
            done |= {item.variant for item in new_items}
            report(Progress(variants_done=len(done), variants_total=brief.variants, step=brief.steps,
                            steps=brief.steps, batch=index + 1, batches=len(batches)), force=True)
    except GenerationCancelled:
        return store.finish(brief_id, "cancelled")
    except Exception as exc:
        store.finish(brief_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    return store.finish(brief_id, "succeeded")


def requeue_stale(store: Store, enqueue: Callable[[str], str], older_than_s: float) -> list[str]:
    """Put unfinished briefs untouched for ``older_than_s`` back on the queue.

    The database, not the broker, is the record of what must be done: a Redis restart
    can drop a message that a worker had popped but not yet recorded as unacknowledged.
    A requeued brief that is in fact still queued runs once and its duplicate message
    finds it finished, so a sweep can only add work, never lose or repeat it.
    """
    from datetime import timedelta

    from genshop.store import utcnow

    requeued = []
    for record in store.claim_stale(utcnow() - timedelta(seconds=older_than_s)):
        store.mark_enqueued(record.id, enqueue(record.id))
        requeued.append(record.id)
    return requeued


def cancel_brief(store: Store, brief_id: str) -> BriefRecord:
    return store.request_cancel(brief_id)


def brief_with_items(store: Store, brief_id: str) -> BriefWithItems:
    return BriefWithItems(brief=store.get_brief(brief_id), items=store.list_items(brief_id))
