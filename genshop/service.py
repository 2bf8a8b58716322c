"""The brief lifecycle, one code path for every face: submit, run, cancel, read back.

The CLI, the Celery tasks and the in-process worker of ``genshop demo`` /
``submit --local`` all call these functions; a Celery task is a thin wrapper that
passes its own progress callback.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from genshop.briefs import Brief, resolve_brief
from genshop.presets import load_preset
from genshop.queueing import brief_priority, enqueue_waiting
from genshop.store import BriefRecord, ItemRecord, NewItem, Store, UnderstandingRecord, UnknownBriefError

if TYPE_CHECKING:  # generating imports torch: submit, status and cancel (the CLI, the API) never do
    from genshop.generation import GeneratedImage
    from genshop.pipelines import LoadedPipeline


class Progress(BaseModel):
    variants_done: int
    variants_total: int
    step: int
    steps: int
    batch: int
    batches: int


ProgressCallback = Callable[[Progress], None]
BriefProgressCallback = Callable[[str, Progress], None]  # (brief id, its progress): several briefs in one run
# given the briefs a delivery has just finished as succeeded (so none had follow-ups queued yet), queue
# their follow-up tasks; returns the ids of the briefs it queued them for (recorded with the lease's release)
FollowupsCallback = Callable[[list[BriefRecord]], list[str]]


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


class BestOfPick(BaseModel):
    """How a best-of-N item was picked: N, the kept candidate, its rank (1 = top) and every candidate's score."""

    n: int
    kept: int
    rank: int
    scores: list[float]


def best_of_pick(timings: dict[str, float]) -> BestOfPick | None:
    """An item's best-of-N record back from its ``timings`` (None: a single sample)."""
    if "best_of_n" not in timings:
        return None
    n = int(timings["best_of_n"])
    return BestOfPick(n=n, kept=int(timings["best_of_kept"]), rank=int(timings["best_of_rank"]),
                      scores=[timings[f"best_of_score_{c}"] for c in range(n)])


class ItemDetails(ItemRecord):
    """A generated item with what the later stages added: per-group scores, understanding."""

    scores: list[ItemScore]
    understanding: ItemUnderstanding | None
    best_of: BestOfPick | None = None  # a best-of-N item: its rank and the other candidates' scores


def submit_brief(store: Store, brief: Brief, preset_name: str, designer: str | None = None,
                 max_queued: int | None = None) -> tuple[BriefRecord, bool]:
    """Resolve the brief against the preset (raises ``BriefError``) and store it as queued.
    Returns (record, created); a known client reference returns the first brief. A
    ``designer`` owns the brief, and may have at most ``max_queued`` queued (``QueueLimitError``)."""
    if brief.client_reference and (existing := store.find_by_reference(brief.client_reference)):
        return existing, False
    return store.create_brief(resolve_brief(brief, load_preset(preset_name)), preset_name, designer, max_queued)


def enqueue_brief(store: Store, brief_id: str, enqueue: Callable[[str, int], str]) -> BriefRecord:
    """Put a stored, queued brief on the generation queue at its priority (``enqueue(brief_id,
    priority)`` returns the task id; ``genshop.queueing`` says how fairness is kept). If the queue cannot take it, the brief is deleted again and the error raised: nothing is
    left half-submitted."""
    record = store.get_brief(brief_id)
    if record.status != "queued":  # submitted while a pause covers it: resuming the queue enqueues it
        return record
    try:
        store.mark_enqueued(brief_id, enqueue(brief_id, brief_priority(store, record)))
    except Exception:
        store.delete_queued_brief(brief_id)
        raise
    return store.get_brief(brief_id)


class _Heartbeat:
    """Renews the leases of the briefs a delivery runs every ``interval_s`` from a daemon thread
    (a denoising step, an adapter switch or a batch's PNGs may take longer than the lease).
    ``lost`` holds the briefs another delivery took over: this one must stop them."""

    def __init__(self, store: Store, brief_ids: list[str], owner: str, interval_s: float):
        self.store, self.brief_ids, self.owner, self.interval_s = store, list(brief_ids), owner, interval_s
        self.lost: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.brief_ids[0][:8]}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            for brief_id in self.brief_ids:
                if brief_id in self.lost:
                    continue
                try:
                    if not self.store.renew_lease(brief_id, self.owner):
                        self.lost.add(brief_id)
                except Exception:  # noqa: BLE001 - a database blip: the next beat tries again, the lease has slack
                    pass

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


_best_of_scorers: dict = {}


def best_of_scorer():
    """The settings' best-of-N reward (``GENSHOP_BEST_OF_REWARD``) as a scorer, loaded once."""
    from genshop.generation import reward_scorer
    from genshop.settings import get_settings

    folder = get_settings().best_of_reward
    if folder is None:
        raise ValueError("a best-of-N brief needs a reward (GENSHOP_BEST_OF_REWARD and GENSHOP_REWARD_MODEL are off)")
    if folder not in _best_of_scorers:
        _best_of_scorers[folder] = reward_scorer(folder)
    return _best_of_scorers[folder]


def best_of_timings(record: dict | None) -> dict[str, float]:
    """A best-of-N pick as the item's numeric record: N, the kept candidate and its rank (1 = top),
    and every candidate's score (``best_of_score_<c>``; the candidates' seeds follow from
    ``generation.candidate_seed``)."""
    if not record:
        return {}
    return {"best_of_n": float(record["n"]), "best_of_kept": float(record["kept"]),
            "best_of_rank": float(record["rank"]),
            **{f"best_of_score_{c}": float(score) for c, score in enumerate(record["scores"])}}


def _store_batch(store: Store, images: list, brief: Brief, brief_id: str, model_id: str, revision: str) -> set[int]:
    """Write a batch's PNGs, then its item rows in one transaction; returns the variants stored."""
    return {variant for _, variant in _store_images(store, [(brief_id, brief, g) for g in images], model_id, revision)}


def _store_images(store: Store, images: list[tuple[str, Brief, GeneratedImage]], model_id: str,
                  revision: str) -> list[tuple[str, int]]:
    """Write a call's PNGs (of one brief or several: (brief id, brief, image)), then their item rows in
    one transaction; returns the (brief id, variant) pairs stored.

    If anything fails (disk full, database error), the PNGs this call created and no row
    refers to are removed again, so a failed write leaves no orphan files (and ``put`` leaves
    no ``.tmp``); a redelivery regenerates the batch with the same seeds."""
    created: list[tuple[str, str]] = []
    try:
        new_items = []
        for brief_id, brief, generated in images:
            sha, path, is_new = store.images.put_new(generated.image)
            if is_new:
                created.append((sha, path))
            new_items.append(NewItem(
                brief_id=brief_id, variant=generated.variant, prompt=generated.prompt,
                negative_prompt=generated.negative_prompt, seed=generated.seed, steps=brief.steps,
                guidance_scale=brief.guidance_scale, width=brief.width, height=brief.height,
                model_id=model_id, model_revision=revision, image_sha256=sha, image_path=path,
                timings={**generated.timings, **best_of_timings(generated.best_of)},
            ))
        store.add_items(new_items)
    except BaseException:
        for sha, path in created:
            try:
                if not store.image_in_use(sha):
                    store.images.remove(path)
            except Exception:  # noqa: BLE001 - best effort; the original error is the one to report
                pass
        raise
    return [(item.brief_id, item.variant) for item in new_items]


def run_brief(
    store: Store,
    brief_id: str,
    loaded: LoadedPipeline,
    max_attempts: int,
    on_progress: ProgressCallback | None = None,
    progress_interval_s: float = 0.25,
    owner: str | None = None,
    lease_s: float = 60.0,
    followups: FollowupsCallback | None = None,
) -> BriefRecord:
    """Generate every variant the brief still lacks, then mark it finished.

    Progress goes to the store, and to ``on_progress``, at most every
    ``progress_interval_s`` and after every batch.

    One delivery at a time: the run first takes the brief's lease as ``owner`` (a unique
    name of this delivery's process) and renews it every ``lease_s / 4`` seconds. A delivery
    that finds the lease held by a live run returns the brief as it is, without running it;
    the holder finishes it, or, if the holder dies, the lease lapses (or the worker's main
    process releases it) and the brief's own redelivered message, or the requeue sweep,
    brings it back.

    Idempotent per brief and variant: variants already stored are skipped and inserts
    of existing (brief, variant) pairs are ignored, so a redelivered task completes the
    brief without duplicates. Cancellation is checked at every denoising step.

    ``followups`` is called with the brief when this delivery finished it as succeeded, before
    the lease is given back; the release records the follow-ups it queued in the same write
    (a delivery that dies first leaves them unrecorded: the brief's redelivery queues them).
    """
    owner = owner or f"local:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    taken, others = store.start_runs([brief_id], owner, lease_s, max_attempts)  # lease and start: one transaction
    if not taken:  # another delivery holds it, or it is finished, cancelled or paused (its lease given back)
        if brief_id not in others:
            raise UnknownBriefError(f"no brief with id {brief_id!r}")
        return others[brief_id]
    record, queued = taken[0], []
    try:
        with _Heartbeat(store, [brief_id], owner, max(0.5, lease_s / 4)) as heartbeat:
            record = _generate_missing(store, record, loaded, on_progress, progress_interval_s,
                                       lambda: brief_id in heartbeat.lost)
        if followups and record.status == "succeeded" and brief_id not in heartbeat.lost:
            queued = followups([record])
        return record
    finally:
        try:
            store.release_leases([brief_id], owner, followups_queued=queued)
        except Exception:  # noqa: BLE001 - the lease lapses by itself; the run's own outcome is what counts
            pass


def _generate_missing(store: Store, record: BriefRecord, loaded: LoadedPipeline, on_progress: ProgressCallback | None,
                      progress_interval_s: float, lost: Callable[[], bool]) -> BriefRecord:
    from genshop.adapters import use_group
    from genshop.generation import GenerationCancelled, generate_batch, plan_batches

    brief_id, brief = record.id, record.brief
    batches = plan_batches(brief, loaded.preset.defaults.batch_size, frozenset(loaded.adapters))
    done = store.existing_variants(brief_id)
    final: Progress | None = None
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

            images = generate_batch(loaded, brief, variants,
                                    lambda: lost() or store.is_cancel_requested(brief_id), on_step,
                                    scorer=best_of_scorer() if brief.best_of > 1 else None)
            done |= _store_batch(store, [g for g in images if g.variant not in done], brief, brief_id, model_id,
                                 revision)
            progress = Progress(variants_done=len(done), variants_total=brief.variants, step=brief.steps,
                                steps=brief.steps, batch=index + 1, batches=len(batches))
            if index < len(batches) - 1:
                report(progress, force=True)
            else:  # stored with the finish, in its transaction; no RUNNING note just before the result
                final = progress
    except GenerationCancelled:
        if lost():  # another delivery took the brief over: it finishes it, not this one
            return store.get_brief(brief_id)
        return store.finish(brief_id, "cancelled")
    except Exception as exc:
        store.finish(brief_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    return store.finish(brief_id, "succeeded", progress=final and final.model_dump())


def run_briefs(
    store: Store,
    brief_ids: list[str],
    loaded: LoadedPipeline,
    max_attempts: int,
    on_progress: BriefProgressCallback | None = None,
    progress_interval_s: float = 0.25,
    owner: str | None = None,
    lease_s: float = 60.0,
    followups: FollowupsCallback | None = None,
) -> dict[str, BriefRecord]:
    """``run_brief`` for several briefs in one delivery, their variants denoised together.

    Each brief is taken as ``run_brief`` takes it (its own lease, attempt and finish; one
    another delivery holds, or that is finished or cancelled, is returned as it is). The
    variants still missing are grouped by ``generation.shared_call_key`` (adapter, steps,
    guidance, size, negative prompt) and each group is denoised in calls of up to the
    preset's batch size, whichever brief the variants belong to; every variant keeps its own
    seeded generator. Best-of-N briefs run alone, as in ``run_brief``.

    Per brief, as alone: progress goes to the store (one write for every brief of a call)
    and to ``on_progress``; a cancel stops the brief at the next denoising step (it is
    finished as cancelled then, its images of that call are dropped, and the call goes on for
    the others, or stops when no brief in it is left); an error fails the briefs of the call
    that raised it. ``followups`` is called, as in ``run_brief``, with the briefs this delivery
    finished as succeeded, all at once. Returns every brief's record that this delivery saw, by id."""
    owner = owner or f"local:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    taken, records = store.start_runs(list(dict.fromkeys(brief_ids)), owner, lease_s, max_attempts)
    queued: list[str] = []
    try:
        if taken:
            with _Heartbeat(store, [r.id for r in taken], owner, max(0.5, lease_s / 4)) as heartbeat:
                finished = _generate_together(store, taken, loaded, on_progress, progress_interval_s, heartbeat.lost)
            records.update(finished)
            succeeded = [r for b, r in finished.items() if r.status == "succeeded" and b not in heartbeat.lost]
            if followups and succeeded:
                queued = followups(succeeded)
    finally:
        if taken:
            try:  # every lease this run holds, in one write
                store.release_leases([r.id for r in taken], owner, followups_queued=queued)
            except Exception:  # noqa: BLE001 - the leases lapse by themselves
                pass
    return records


def _generate_together(store: Store, records: list[BriefRecord], loaded: LoadedPipeline,
                       on_progress: BriefProgressCallback | None, progress_interval_s: float,
                       lost: set[str]) -> dict[str, BriefRecord]:
    from genshop.adapters import use_group
    from genshop.generation import GenerationCancelled, generate_across_briefs, plan_batches, shared_call_key

    briefs = {r.id: r.brief for r in records}
    outcome: dict[str, BriefRecord] = {}
    for record in (r for r in records if r.brief.best_of > 1):
        outcome[record.id] = _generate_missing(
            store, record, loaded, on_progress and (lambda p, b=record.id: on_progress(b, p)), progress_interval_s,
            lambda b=record.id: b in lost)
    batch_size = loaded.preset.defaults.batch_size
    done = {b: {item.variant for item in items}
            for b, items in store.list_items_of([b for b in briefs if b not in outcome]).items()}
    calls: dict[tuple, list[tuple[str, int]]] = {}
    for brief_id in done:
        for adapter, variants in plan_batches(briefs[brief_id], batch_size, frozenset(loaded.adapters)):
            calls.setdefault(shared_call_key(briefs[brief_id], adapter), []).extend(
                (brief_id, v) for v in variants if v not in done[brief_id])
    chunks = [(key, units[start:start + batch_size]) for key, units in calls.items()
              for start in range(0, len(units), batch_size)]
    batches = {b: sum(any(u == b for u, _ in units) for _, units in chunks) for b in done}
    batch_of = dict.fromkeys(done, 0)
    stopped: set[str] = set()  # cancelled, or taken over by another delivery
    failed: dict[str, str] = {}
    last_write = time.monotonic()

    def progress_of(in_call: list[str], step: int, steps: int) -> dict[str, Progress]:
        return {b: Progress(variants_done=len(done[b]), variants_total=briefs[b].variants, step=step, steps=steps,
                            batch=batch_of[b], batches=batches[b]) for b in in_call if b not in stopped}

    def report(in_call: list[str], step: int, steps: int, force: bool = False) -> None:
        nonlocal last_write
        now = time.monotonic()
        if not (force or now - last_write >= progress_interval_s):
            return
        last_write = now
        progress = progress_of(in_call, step, steps)
        store.update_progress_many({b: p.model_dump() for b, p in progress.items()})
        if on_progress:  # not after a brief's last call: its result follows at once
            for b, p in progress.items():
                if not (force and p.batch == p.batches):
                    on_progress(b, p)

    final: dict[str, dict] = {}  # the progress of the last call's briefs: stored with their finish, in its transaction
    for index, (key, units) in enumerate(chunks):
        units = [(b, v) for b, v in units if b not in stopped and b not in failed]
        if not units:
            continue
        in_call = list(dict.fromkeys(b for b, _ in units))
        for b in in_call:
            batch_of[b] += 1

        def should_stop(in_call=in_call) -> bool:
            cancelled = store.cancel_requested_among([b for b in in_call if b not in stopped])
            for b in in_call:
                if b not in stopped and (b in lost or b in cancelled):
                    stopped.add(b)
                    if b not in lost:  # taken over: the other delivery finishes it, not this one
                        outcome[b] = store.finish(b, "cancelled")
            return all(b in stopped for b in in_call)

        try:
            use_group(loaded.pipeline, key[0], loaded.adapters)
            model_id, revision = loaded.identity(key[0])
            images = generate_across_briefs(loaded, [(briefs[b], v) for b, v in units], should_stop,
                                            lambda step, steps, in_call=in_call: report(in_call, step, steps))
        except GenerationCancelled:
            continue
        except Exception as exc:  # noqa: BLE001 - recorded on the briefs of this call, the others go on
            failed.update(dict.fromkeys(in_call, f"{type(exc).__name__}: {exc}"))
            continue
        made = [(b, briefs[b], g) for (b, _), g in zip(units, images) if b not in stopped and g.variant not in done[b]]
        try:
            for b, variant in _store_images(store, made, model_id, revision):
                done[b].add(variant)
        except Exception as exc:  # noqa: BLE001 - a disk full, say: the call's briefs fail, its PNGs removed
            failed.update(dict.fromkeys(in_call, f"{type(exc).__name__}: {exc}"))
        if index < len(chunks) - 1:
            report(in_call, key[1], key[1], force=True)
        else:  # no RUNNING note just before the results
            final = {b: p.model_dump() for b, p in progress_of(in_call, key[1], key[1]).items()}

    for b in (b for b in done if b in lost and b not in outcome):
        outcome[b] = store.get_brief(b)
    outcome.update(store.finish_runs({b: ("failed", failed[b]) if b in failed else ("succeeded", None)
                                      for b in done if b not in outcome}, final))
    return outcome


def requeue_stale(store: Store, enqueue: Callable[[str, int], str], older_than_s: float,
                  in_broker: Callable[[list[str]], set[str]] | None = None,
                  lease_s: float | None = None, recheck_s: float = 2.0) -> list[str]:
    """Put unfinished briefs whose queue message is truly lost back on the queue.

    The database, not the broker, is the record of what must be done: a Redis restart
    can drop a message that a worker had popped but not yet recorded as unacknowledged.

    The invariant: a brief has at most one generation message, plus at most one for each
    time its message was lost. So a brief is requeued only if it is unfinished, untouched
    and not enqueued for ``older_than_s``, no live delivery holds its lease (``lease_s``,
    default ``older_than_s``), and ``in_broker`` (given the candidates, it returns those
    whose message the broker still holds, waiting in the queue or reserved by a worker)
    does not name it, twice, ``recheck_s`` apart: a message is briefly in neither the queue
    nor the unacknowledged set while a worker takes it (popped, not yet recorded) or Redis
    restores it, and a loaded machine can stretch that moment; by the second look it is in
    one of them again, or its brief has been started or finished (which the claim's
    compare-and-set sees). A backlog that takes longer than ``older_than_s`` to drain is
    therefore left alone, however long it is. Without ``in_broker`` every stale brief is
    requeued (a duplicate message finds the brief finished, or its lease held).
    """
    from datetime import timedelta

    from genshop.store import utcnow

    now = utcnow()
    lease_cutoff = now - timedelta(seconds=older_than_s if lease_s is None else lease_s)
    stale = store.stale_briefs(now - timedelta(seconds=older_than_s), lease_cutoff)
    if stale and in_broker is not None:
        for look in range(2):
            if look:
                time.sleep(recheck_s)
            held = in_broker(stale) if stale else set()
            stale = [brief_id for brief_id in stale if brief_id not in held]
    return enqueue_waiting(store, store.claim_stale(now - timedelta(seconds=older_than_s), stale), enqueue)


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
    return details_of(store, store.list_items(brief_id))


def details_of(store: Store, items: list[ItemRecord]) -> list[ItemDetails]:
    """Items (of any briefs) with their per-group reward scores and their understanding."""
    scores: dict[str, list[ItemScore]] = {}
    for score in store.list_item_scores([item.id for item in items]):
        scores.setdefault(score.item_id, []).append(ItemScore.model_validate(score.model_dump()))
    understood = {u.item_id: _understanding(u) for u in store.list_understandings([item.id for item in items])}
    return [ItemDetails(**item.model_dump(), scores=scores.get(item.id, []), understanding=understood.get(item.id),
                        best_of=best_of_pick(item.timings))
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
