"""Batching across briefs: variants of briefs that share settings denoised in one pipeline call,
each image equal to the one its brief makes alone; a worker gathers queued messages into groups,
and cancellation, progress and exactly-once stay per brief."""

from __future__ import annotations

import numpy as np
from PIL import Image

from genshop.briefs import parse_brief
from genshop.store import Store
from tests.conftest import make_env, wait_for

# uint8 pixels: a different batch size may change float rounding in the BLAS kernels, never more than this
PIXEL_TOLERANCE = 2


def test_variants_of_several_briefs_share_calls_and_equal_their_unbatched_images(env, tmp_path):
    from genshop.generation import generate_batch
    from genshop.pipelines import load_pipeline
    from genshop.service import run_briefs, submit_brief

    loaded = load_pipeline("tiny-random")
    store = Store(f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "files")
    specs = [{"title": "Red kurta", "variants": 3, "seed": 1}, {"title": "Blue jeans", "variants": 2, "seed": 50},
             {"title": "Black watch", "variants": 4, "seed": 7}, {"title": "Green shoes", "variants": 1, "seed": 9,
                                                                 "steps": 1}]
    ids = [submit_brief(store, parse_brief({"steps": 2, "guidance_scale": 5.0, **spec}), "tiny-random")[0].id
           for spec in specs]
    cancelled = submit_brief(store, parse_brief({"title": "Withdrawn", "variants": 2, "steps": 2}), "tiny-random")[0]
    store.request_cancel(cancelled.id)
    calls = []
    hook = loaded.pipeline.unet.register_forward_hook(lambda module, args, kwargs, output: calls.append(
        (kwargs.get("sample") if kwargs.get("sample") is not None else args[0]).shape[0]), with_kwargs=True)
    try:
        records = run_briefs(store, [*ids, cancelled.id], loaded, max_attempts=2)
    finally:
        hook.remove()
    assert {b: r.status for b, r in records.items()} == {**dict.fromkeys(ids, "succeeded"), cancelled.id: "cancelled"}
    # 9 variants of 2 steps: 8 in one call, 1 in a second (classifier-free guidance doubles the batch); 1 step alone
    assert calls == [16, 16, 2, 2, 2]
    for brief_id in ids:
        record = store.get_brief(brief_id)
        alone = generate_batch(loaded, record.brief, list(range(record.brief.variants)))
        items = store.list_items(brief_id)
        assert record.attempts == 1 and [i.variant for i in items] == list(range(record.brief.variants))
        for item, unbatched in zip(items, alone):
            assert item.seed == unbatched.seed and item.prompt == unbatched.prompt
            batched = np.asarray(Image.open(store.images.path(item.image_path)), dtype=np.int16)
            assert np.abs(batched - np.asarray(unbatched.image, dtype=np.int16)).max() <= PIXEL_TOLERANCE
    assert store.list_items(cancelled.id) == []


def test_a_worker_denoises_queued_briefs_together_and_cancels_one_alone(tmp_path, models_dir, start_worker):
    from celery import Celery
    from celery.result import AsyncResult

    from genshop.service import submit_brief

    env = make_env(tmp_path / "home", models_dir)
    store = Store(f"sqlite:///{tmp_path / 'home' / 'genshop.db'}", tmp_path / "home")
    sender = Celery(broker=env["GENSHOP_BROKER_URL"], backend=env["GENSHOP_BROKER_URL"])
    shared = {"variants": 1, "steps": 60, "width": 64, "height": 64, "guidance_scale": 5.0}
    specs = [{"title": f"Kurta {n}", "seed": n, **shared} for n in range(4)] + [
        {"title": "Quick tee", "variants": 2, "steps": 3, "seed": 9}]
    ids = []
    for spec in specs:  # queued before the worker starts: it receives them together
        record, _ = submit_brief(store, parse_brief(spec), "tiny-random")
        sender.send_task("genshop.generate_brief", args=[record.id], task_id=f"generate-{record.id}",
                         queue=env["GENSHOP_QUEUE"])
        store.mark_enqueued(record.id, f"generate-{record.id}")
        ids.append(record.id)
    worker = start_worker(env)
    together, withdrawn, quick = ids[:4], ids[1], ids[4]
    wait_for(lambda: all(store.get_brief(b).progress.get("step", 0) >= 2 for b in together), 90, 0.05,
             what="every brief of the shared call to show its progress")
    store.request_cancel(withdrawn)
    wait_for(lambda: store.get_brief(withdrawn).is_terminal, 30, 0.05, what="the cancel")
    assert store.get_brief(ids[0]).status == "running"  # stopped at its next step, not at the end of the call
    records = wait_for(lambda: all((r := [store.get_brief(b) for b in ids])[i].is_terminal for i in range(5)) and r,
                       120, 0.2, what="every brief")
    assert [r.status for r in records] == ["succeeded", "cancelled", "succeeded", "succeeded", "succeeded"]
    assert {r.attempts for r in records} == {1} and store.list_items(withdrawn) == []
    for brief_id in together:
        if brief_id != withdrawn:
            [item] = store.list_items(brief_id)
            assert item.timings["batch_size"] == 4.0  # one call for the four briefs
    assert [i.timings["batch_size"] for i in store.list_items(quick)] == [2.0, 2.0]
    for brief_id in ids:  # every message settled once, with its own result
        task = AsyncResult(f"generate-{brief_id}", app=sender)
        if brief_id == withdrawn:
            wait_for(lambda: task.state == "REVOKED", 30, 0.1, what="the cancelled brief's REVOKED state")
        else:
            assert task.get(timeout=30)["status"] == "succeeded"
        assert worker.log.read_text().count(f"[generate-{brief_id}] succeeded") == (brief_id != withdrawn)
