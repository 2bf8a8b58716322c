"""Store (SQLite and PostgreSQL), content-addressed images, generation determinism and cancellation."""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from genshop.briefs import parse_brief, resolve_brief
from genshop.generation import GenerationCancelled, generate_batch, plan_batches
from genshop.pipelines import load_pipeline
from genshop.presets import load_preset
from genshop.service import run_brief, submit_brief
from genshop.store import ImageStore, NewItem, Store

POSTGRES_ADMIN_URL = os.environ.get("GENSHOP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def loaded(env):
    return load_pipeline("tiny-random")


@pytest.fixture
def postgres_url():
    name = f"genshop_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    yield url
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, env):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = Store(url, tmp_path / "files")
    yield store
    store.engine.dispose()


def test_brief_runs_to_completion_and_items_record_their_provenance(store, loaded):
    record, created = submit_brief(store, parse_brief({"title": "Red kurta", "colour": "Red", "variants": 5, "seed": 11}),
                                   "tiny-random")
    assert created and record.status == "queued"
    finished = run_brief(store, record.id, loaded, max_attempts=2)
    assert finished.status == "succeeded" and finished.attempts == 1
    items = store.list_items(record.id)
    assert [i.variant for i in items] == list(range(5)) and [i.seed for i in items] == [11 + v for v in range(5)]
    for item in items:
        assert item.prompt.startswith("Red kurta")
        assert item.model_revision.startswith("sha256:") and item.model_id.startswith("genshop/tiny-random-") and item.timings["generate_s"] > 0
        assert Image.open(store.images.path(item.image_path)).size == (32, 32)


def test_same_client_reference_returns_the_first_brief(store):
    first, created = submit_brief(store, parse_brief({"title": "A", "client_reference": "ref-1"}), "tiny-random")
    again, created_again = submit_brief(store, parse_brief({"title": "B", "client_reference": "ref-1"}), "tiny-random")
    assert created and not created_again and again.id == first.id and again.title == "A"
    assert len(store.list_briefs()) == 1


def test_adding_a_variant_twice_keeps_one_item(store):
    record, _ = submit_brief(store, parse_brief({"title": "A", "variants": 2}), "tiny-random")
    item = NewItem(brief_id=record.id, variant=0, prompt="p", negative_prompt="", seed=1, steps=1, guidance_scale=1.0,
                   width=32, height=32, model_id="m", model_revision="r", image_sha256="0" * 64, image_path="x.png",
                   timings={})
    assert store.add_items([item]) == 1
    assert store.add_items([item, item.model_copy(update={"variant": 1})]) == 1
    assert [i.variant for i in store.list_items(record.id)] == [0, 1]


def test_redelivered_brief_generates_only_missing_variants(store, loaded):
    record, _ = submit_brief(store, parse_brief({"title": "A", "variants": 12, "seed": 3}), "tiny-random")
    store.start_attempt(record.id, max_attempts=2)  # a first delivery whose worker died after batch 1
    brief = store.get_brief(record.id).brief
    adapter, first_batch = plan_batches(brief, loaded.preset.defaults.batch_size)[0]
    assert adapter is None and first_batch == list(range(loaded.preset.defaults.batch_size))
    images = generate_batch(loaded, brief, first_batch)
    kept = {}
    for generated in images:
        sha, path = store.images.put(generated.image)
        kept[generated.variant] = sha
        store.add_items([NewItem(brief_id=record.id, variant=generated.variant, prompt=generated.prompt,
                                 negative_prompt="", seed=generated.seed, steps=1, guidance_scale=1.0, width=32,
                                 height=32, model_id="m", model_revision="r", image_sha256=sha, image_path=path,
                                 timings={})])
    finished = run_brief(store, record.id, loaded, max_attempts=2)
    items = store.list_items(record.id)
    assert finished.status == "succeeded" and finished.attempts == 2 and len(items) == 12
    assert {i.variant: i.image_sha256 for i in items if i.variant in kept} == kept


def test_a_brief_whose_workers_keep_dying_is_failed_not_retried_forever(store):
    record, _ = submit_brief(store, parse_brief({"title": "A"}), "tiny-random")
    assert store.start_attempt(record.id, max_attempts=2).status == "running"
    assert store.start_attempt(record.id, max_attempts=2).status == "running"
    third = store.start_attempt(record.id, max_attempts=2)
    assert third.status == "failed" and "2 deliveries" in third.error


def test_same_brief_seed_and_model_give_the_same_images(tmp_path, loaded):
    store = Store(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "files")
    hashes = []
    for _ in range(2):
        record, _ = submit_brief(store, parse_brief({"title": "Blue jeans", "variants": 3, "seed": 42}), "tiny-random")
        run_brief(store, record.id, loaded, max_attempts=2)
        hashes.append([i.image_sha256 for i in store.list_items(record.id)])
    assert hashes[0] == hashes[1] and len(set(hashes[0])) == 3


def test_cancellation_stops_at_the_next_denoising_step(loaded):
    brief = resolve_brief(parse_brief({"title": "A", "variants": 2, "steps": 20, "seed": 1}), load_preset("tiny-random"))
    steps_run = []
    with pytest.raises(GenerationCancelled):
        generate_batch(loaded, brief, [0, 1], should_stop=lambda: len(steps_run) >= 3,
                       on_step=lambda step, total: steps_run.append(step))
    assert steps_run == [1, 2, 3]


def test_content_addressed_store_writes_each_image_once(tmp_path):
    images = ImageStore(tmp_path)
    red = Image.new("RGB", (8, 8), "red")
    first = images.put(red)
    assert images.put(red.copy()) == first and images.put(Image.new("RGB", (8, 8), "blue")) != first
    assert len(list(tmp_path.rglob("*.png"))) == 2 and first[1].endswith(f"{first[0]}.png")


def test_tiny_random_bundle_loads_with_plain_diffusers(loaded):
    from genshop.presets import model_location

    pipe = StableDiffusionPipeline.from_pretrained(model_location(load_preset("tiny-random")))
    image = pipe("a red kurta", num_inference_steps=2, width=32, height=32).images[0]
    assert image.size == (32, 32)


def test_stale_unfinished_briefs_are_requeued_once_per_sweep(store):
    import time

    from genshop.service import requeue_stale

    sent = []
    lost, _ = submit_brief(store, parse_brief({"title": "lost in a broker restart"}), "tiny-random")
    store.mark_enqueued(lost.id, "generate-x")
    done, _ = submit_brief(store, parse_brief({"title": "finished"}), "tiny-random")
    store.mark_enqueued(done.id, "generate-y")
    store.start_attempt(done.id, max_attempts=2)
    store.finish(done.id, "succeeded")
    time.sleep(0.3)
    fresh, _ = submit_brief(store, parse_brief({"title": "just submitted"}), "tiny-random")
    store.mark_enqueued(fresh.id, "generate-z")

    def enqueue(brief_id: str, priority: int) -> str:
        sent.append(brief_id)
        return f"generate-{brief_id}"

    assert requeue_stale(store, enqueue, older_than_s=0.2) == [lost.id] and sent == [lost.id]
    assert requeue_stale(store, enqueue, older_than_s=0.2) == []  # just re-stamped: not stale again yet


def test_scores_are_stored_once_per_item_group_and_model(store, loaded):
    from genshop.store import NewScore

    record, _ = submit_brief(store, parse_brief({"title": "A", "variants": 2, "groups": ["A", "B"]}), "tiny-random")
    run_brief(store, record.id, loaded, max_attempts=2)
    items = store.list_items(record.id)
    scores = [NewScore(item_id=i.id, group_id=g, reward_model="rm@1", score=float(i.variant) + (g == "B"))
              for i in items for g in ("A", "B")]
    assert store.add_scores(scores) == 4 and store.add_scores(scores[:1]) == 0
    stored = store.list_scores(record.id)
    assert [(s.group_id, s.score) for s in stored] == [("A", 0.0), ("B", 1.0), ("A", 1.0), ("B", 2.0)]


def test_catalog_products_and_understandings_are_kept_once(store):
    import numpy as np

    from genshop.store import NewCatalogProduct, NewUnderstanding, catalog_product_id

    product = NewCatalogProduct(product_id="15970", title="Turtle Check Men Navy Blue Shirt",
                                attributes={"master_category": "Apparel", "colour": "Navy Blue"},
                                image_sha256="ab" * 32, image_path="images/ab/ab/x.png")
    assert store.add_catalog_products([product]) == 1
    assert store.add_catalog_products([product]) == 0  # the same product id: nothing new
    vector = np.linspace(-1, 1, 8, dtype="<f4")
    understanding = NewUnderstanding(
        item_id=catalog_product_id("15970"), kind="catalog", embedding_model="clip@abc", embedding=vector.tobytes(),
        categories={"master_category": {"label": "Apparel", "confidence": 0.99, "abstained": False}},
        attributes={"colour": {"label": "Navy Blue", "confidence": 0.7, "abstained": False}}, title="Men Navy Blue Shirts",
        near_duplicate_of="other", near_duplicate_similarity=0.97)
    assert store.add_understandings([understanding]) == 1
    assert store.add_understandings([understanding.model_copy(update={"title": "changed"})]) == 0
    assert store.add_understandings([understanding.model_copy(update={"embedding_model": "clip@def"})]) == 1
    [kept] = store.list_understandings([catalog_product_id("15970")], "clip@abc")
    assert kept.title == "Men Navy Blue Shirts" and kept.near_duplicate_similarity == pytest.approx(0.97)
    np.testing.assert_array_equal(np.frombuffer(kept.embedding, dtype="<f4"), vector)
    assert len(store.list_understandings([catalog_product_id("15970")])) == 2


def test_a_brief_lease_admits_one_delivery_until_released_or_lapsed(store):
    import time

    record, _ = submit_brief(store, parse_brief({"title": "A"}), "tiny-random")
    assert store.acquire_lease(record.id, "w1@h:1", lease_s=60)
    assert not store.acquire_lease(record.id, "w2@h:2", lease_s=60)  # a duplicate delivery is turned away
    assert store.release_lease(record.id, "w1@h:1")  # the main process saw pid 1 die
    assert not store.release_lease(record.id, "w1@h:1")
    assert store.acquire_lease(record.id, "w2@h:2", lease_s=60)
    time.sleep(0.3)  # w2's worker was killed whole: nobody releases, the heartbeat stops
    assert not store.renew_lease(record.id, "w1@h:1")
    assert store.acquire_lease(record.id, "w3@h:3", lease_s=0.2) and store.lease_owner(record.id) == "w3@h:3"
    assert not store.renew_lease(record.id, "w2@h:2")  # the old holder learns it lost the brief


def test_the_sweep_leaves_briefs_whose_message_the_broker_holds(store):
    import time

    from genshop.service import requeue_stale

    waiting, _ = submit_brief(store, parse_brief({"title": "waiting in a long queue"}), "tiny-random")
    lost, _ = submit_brief(store, parse_brief({"title": "lost"}), "tiny-random")
    running, _ = submit_brief(store, parse_brief({"title": "running, lease held"}), "tiny-random")
    for record in (waiting, lost, running):
        store.mark_enqueued(record.id, f"generate-{record.id}")
    time.sleep(0.3)
    store.acquire_lease(running.id, "w@h:1", lease_s=60)
    looks = []

    def in_broker(brief_ids: list[str]) -> set[str]:
        looks.append(sorted(brief_ids))
        return {waiting.id} & set(brief_ids)

    sent = []
    assert requeue_stale(store, lambda b, _priority: sent.append(b) or f"generate-{b}", 0.2, in_broker, lease_s=60,
                         recheck_s=0) == [lost.id] == sent
    assert looks == [sorted([waiting.id, lost.id]), [lost.id]]  # asked twice, the running brief never
