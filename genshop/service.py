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
from genshop.store import BriefRecord, ItemRecord, NewItem, Store, UnderstandingRecord


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


class ItemScore(BaseModel):
    group_id: str
    reward_model: str
    score: float
    population_fallback: bool


class ItemUnderstanding(BaseModel):
    kind: str
    embedding_model: str
    categories: dict
    attributes: dict
    title: str
    near_duplicate_of: str | None
    near_duplicate_similarity: float | None


class ItemDetails(ItemRecord):
    """A generated item with what the later stages added: per-group scores, understanding."""

    scores: list[ItemScore]
    understanding: ItemUnderstanding | None


def submit_brief(store: Store, brief: Brief, preset_name: str, designer: str | None = None,
                 max_queued: int | None = None) -> tuple[BriefRecord, bool]:
    """Resolve the brief against the preset (raises ``BriefError``) and store it as queued.
    Returns (record, created); a known client reference returns the first brief. A
    ``designer`` owns the brief, and may have at most ``max_queued`` queued (``QueueLimitError``)."""
    if brief.client_reference and (existing := store.find_by_reference(brief.client_reference)):
        return existing, False
    return store.create_brief(resolve_brief(brief, load_preset(preset_name)), preset_name, designer, max_queued)


def enqueue_brief(store: Store, brief_id: str, enqueue: Callable[[str], str]) -> BriefRecord:
    """Put a stored, queued brief on the generation queue (``enqueue`` returns the task id).
    If the queue cannot take it, the brief is deleted again and the error raised: nothing is
    left half-submitted."""
    try:
        store.mark_enqueued(brief_id, enqueue(brief_id))
    except Exception:
        store.delete_queued_brief(brief_id)
        raise
    return store.get_brief(brief_id)


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


def cancel_brief(store: Store, brief_id: str, revoke: Callable[[str], None] | None = None) -> BriefRecord:
    """Cancel a brief: a queued one at once, a running one at its next denoising step.
    ``revoke`` (given a task id) also withdraws a cancelled brief's queue message, so no
    worker takes it; the store's flag alone already makes a worker discard it."""
    record = store.request_cancel(brief_id)
    if revoke and record.task_id and record.status == "cancelled":
        revoke(record.task_id)
    return record


def brief_with_items(store: Store, brief_id: str) -> BriefWithItems:
    return BriefWithItems(brief=store.get_brief(brief_id), items=store.list_items(brief_id))


def _understanding(record: UnderstandingRecord) -> ItemUnderstanding:
    return ItemUnderstanding.model_validate(record.model_dump(exclude={"item_id", "embedding", "created_at"}))


def item_details(store: Store, brief_id: str) -> list[ItemDetails]:
    """The brief's items, each with its per-group reward scores and its understanding."""
    items = store.list_items(brief_id)
    scores: dict[str, list[ItemScore]] = {}
    for score in store.list_scores(brief_id):
        scores.setdefault(score.item_id, []).append(ItemScore.model_validate(score.model_dump()))
    understood = {u.item_id: _understanding(u) for u in store.list_understandings([item.id for item in items])}
    return [ItemDetails(**item.model_dump(), scores=scores.get(item.id, []), understanding=understood.get(item.id))
            for item in items]


def same_design(item: ItemRecord) -> tuple:
    """What makes two items the same design made by two models: prompt, seed and settings."""
    return item.prompt, item.negative_prompt, item.seed, item.steps, item.guidance_scale, item.width, item.height


def counterparts(items: list[ItemRecord], others: list[ItemRecord]) -> dict[str, list[ItemRecord]]:
    """For each item, the items among ``others`` with the same design from a different model
    (base vs a group's LoRA): item id → those items, for side-by-side comparison."""
    by_design: dict[tuple, list[ItemRecord]] = {}
    for other in others:
        by_design.setdefault(same_design(other), []).append(other)
    return {item.id: [o for o in by_design.get(same_design(item), []) if o.model_id != item.model_id]
            for item in items}
