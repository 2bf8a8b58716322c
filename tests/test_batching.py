"""Batching across briefs: variants of briefs that share settings denoised in one pipeline call,
each image equal to the one its brief makes alone; a worker gathers queued messages into groups,
and cancellation, progress and exactly-once stay per brief."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
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

    env = make_env(tmp_path / "home", models_dir, GENSHOP_GATHER_WINDOW_MS="1500")  # the first waits for company
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
        line = f"[generate-{brief_id}] succeeded"
        if brief_id != withdrawn:  # the pool process logs it just after storing the result task.get read
            wait_for(lambda line=line: line in worker.log.read_text(), 10, 0.05, what="the success log line")
        assert worker.log.read_text().count(line) == (brief_id != withdrawn)


def test_scoring_and_enrichment_of_several_briefs_take_one_clip_forward(env, tmp_path, open_clip_dir):
    from genshop.embedding import EmbeddingConfig
    from genshop.enrichment import EnrichConfig, enrich_brief, enrich_briefs, load_enricher
    from genshop.pipelines import load_pipeline
    from genshop.service import run_briefs, submit_brief
    from reward.brief_scoring import load_brief_scorer, score_brief, score_briefs
    from tests.test_reward_model import tiny_model

    store = Store(f"sqlite:///{tmp_path / 's.db'}", tmp_path / "files")
    ids = [submit_brief(store, parse_brief({"title": title, "variants": variants, "seed": n, "steps": 1, "width": 16,
                                            "height": 16, "groups": ["A", "B"]}), "tiny-random")[0].id
           for n, (title, variants) in enumerate([("Red kurta", 2), ("Blue jeans", 3), ("Black watch", 1)])]
    run_briefs(store, ids, load_pipeline("tiny-random"), max_attempts=2)
    embedding = EmbeddingConfig.for_directory(open_clip_dir)
    scorer = load_brief_scorer(tiny_model(embedding=embedding).save_pretrained(tmp_path / "reward"))
    enricher = load_enricher(EnrichConfig(embedding=embedding, index_dir=tmp_path / "index"))
    forwards = []
    hooks = [e.model.visual.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
             for e in (scorer.embedder, enricher.embedder)]
    try:
        scored = score_briefs(store, ids, scorer)
        understood = enrich_briefs(store, ids, enricher)
        assert forwards == [6, 6]  # the 6 images of 3 briefs: one forward to score, one to enrich
        assert score_briefs(store, ids, scorer) == scored and forwards == [6, 6]  # scored already: only read back
    finally:
        for hook in hooks:
            hook.remove()
    assert [len(scored[b]) for b in ids] == [4, 6, 2] and [len(understood[b]) for b in ids] == [2, 3, 1]
    alone_store = Store(f"sqlite:///{tmp_path / 'alone.db'}", tmp_path / "files")  # the same briefs scored one by one
    for brief_id in ids:
        record = store.get_brief(brief_id)
        copy, _ = alone_store.create_brief(record.brief, "tiny-random")
        alone_store.add_items([item.model_copy(update={"brief_id": copy.id}) for item in store.list_items(brief_id)])
        alone = score_brief(alone_store, copy.id, scorer)
        assert [s.score for s in alone] == [pytest.approx(s.score, abs=1e-4) for s in scored[brief_id]]
        own_index = replace(enricher, config=enricher.config.model_copy(update={"index_dir": tmp_path / copy.id}))
        for a, b in zip(enrich_brief(alone_store, copy.id, own_index), understood[brief_id]):
            np.testing.assert_allclose(np.frombuffer(a.embedding, "<f4"), np.frombuffer(b.embedding, "<f4"), atol=1e-5)


def test_concurrent_text_searches_share_one_clip_forward_and_repeats_are_cached(env, monkeypatch, open_clip_dir):
    import asyncio

    import httpx

    from genshop.settings import get_settings
    from genshop.understanding.index import IndexConfig, build_index
    from genshop.understanding.search import search
    from genshop.web.app import _embedder, create_app, current_index

    monkeypatch.setenv("GENSHOP_EMBEDDING_MODEL", str(open_clip_dir))
    monkeypatch.setenv("GENSHOP_API_TOKENS", "ana:token-ana")
    get_settings.cache_clear()
    settings = get_settings()
    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    build_index(IndexConfig(dim=16), [f"p{i}" for i in range(300)], vectors,
                [{"kind": "catalog", "title": f"product {i}", "image_path": ""} for i in range(300)]).save(
        settings.index_dir)
    app = create_app(settings)
    embedder = _embedder(settings.embedding_model, settings.device)
    texts = [f"{colour} {thing}" for colour in ("red", "blue", "black", "white") for thing in ("kurta", "jeans",
                                                                                              "watch", "shoes")]
    forwards = []
    hook = embedder.model.transformer.register_forward_hook(lambda module, args, output: forwards.append(1))

    async def ask_all() -> list[list[str]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers={"Authorization": "Bearer token-ana"}) as client:
            answers = await asyncio.gather(*(client.get("/api/search", params={"q": t, "k": 5}) for t in texts))
        assert {a.status_code for a in answers} == {200}
        return [[hit["id"] for hit in a.json()] for a in answers]

    try:
        first = asyncio.run(ask_all())
        calls = len(forwards)
        again = asyncio.run(ask_all())
    finally:
        hook.remove()
    assert calls < len(texts) / 2  # batched: a lone first query, then the others together
    assert len(forwards) == calls and again == first  # the repeats came from the cache
    index = current_index(settings.index_dir)
    assert first == [[h.id for h in search(index, embedder, t, k=5)] for t in texts]
