"""The enrich stage: generated and imported catalog items embedded, categorized, indexed, searchable,
checked for near-duplicates; by a real worker on its own queue and in process; bad queries refused."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import cli_json, cli_json_here, invoke_cli, make_env, wait_for, write_brief
from tests.test_clip_training import write_catalog


def enrich_env(tmp_path: Path, models_dir: Path, open_clip_dir: Path, **overrides: str) -> dict[str, str]:
    return make_env(tmp_path / "home", models_dir, **{"GENSHOP_EMBEDDING_MODEL": str(open_clip_dir),
                                                      "GENSHOP_UNDERSTANDING": "off", **overrides})


def index_files(env: dict[str, str]) -> dict[str, str]:
    folder = Path(env["GENSHOP_HOME"]) / "index"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_worker_enriches_every_generated_item_and_flags_a_regenerated_brief(tmp_path, models_dir, open_clip_dir,
                                                                              start_worker):
    env = enrich_env(tmp_path, models_dir, open_clip_dir)
    start_worker(env)
    brief = write_brief(tmp_path / "b.json", variants=3, seed=7)
    first = cli_json(["submit", str(brief), "--json", "--wait"], env)

    def enriched(brief_id: str):
        results = cli_json_here(["results", brief_id, "--json"], env)  # the store read in this process
        return all(item["understanding"] for item in results["items"]) and results
    results = wait_for(lambda: enriched(first["brief_id"]), 90, 0.5, what="understandings of the first brief")
    for item in results["items"]:
        understanding = item["understanding"]
        assert set(understanding["categories"]) == {"master_category", "sub_category", "article_type"}
        assert understanding["kind"] == "generated" and understanding["title"]
        assert understanding["near_duplicate_of"] is None or understanding["near_duplicate_of"] in \
            {i["id"] for i in results["items"]}

    hits = cli_json_here(["search", "women's red kurta", "--json", "--k", "10"], env)
    assert sorted(hit["id"] for hit in hits) == sorted(item["id"] for item in results["items"])
    assert all(hit["kind"] == "generated" for hit in hits)

    # the same brief and seed again: the same images, so each is flagged as a near-duplicate (the tiny random
    # CLIP maps the tiny random model's images close together, so which item it matches is left to the unit test)
    second = cli_json(["submit", str(write_brief(tmp_path / "b2.json", variants=3, seed=7)), "--json", "--wait"], env)
    again = wait_for(lambda: enriched(second["brief_id"]), 90, 0.5, what="understandings of the second brief")
    known = {item["id"] for item in results["items"] + again["items"]}
    for item in again["items"]:
        assert item["understanding"]["near_duplicate_of"] in known - {item["id"]}
        assert item["understanding"]["near_duplicate_similarity"] == pytest.approx(1.0, abs=1e-3)
    assert len(cli_json_here(["search", "kurta", "--json", "--k", "50"], env)) == 6


def test_near_duplicates_match_the_index_and_earlier_items_of_the_batch_never_themselves():
    import numpy as np

    from genshop.enrichment import near_duplicates
    from genshop.understanding.index import IndexConfig, VectorIndex

    index = VectorIndex(IndexConfig(dim=3))
    index.add(["old-x", "old-y"], np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    new = np.array([[0.999, 0.04, 0], [0, 0, 1.0], [0, 0.05, 0.998], [0, 1.0, 0]])
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    found = near_duplicates(index, ["a", "b", "c", "old-y"], new, above=0.95)
    assert found[0][0] == "old-x" and found[0][1] == pytest.approx(new[0, 0])
    assert found[1] is None  # nothing like it
    assert found[2][0] == "b"  # an earlier item of the same batch
    assert found[3] is None  # a redone item is not its own duplicate, and nothing else is close


def test_catalog_import_is_searchable_with_filters_and_idempotent(tmp_path, models_dir, open_clip_dir):
    env = enrich_env(tmp_path, models_dir, open_clip_dir)
    catalog = write_catalog(tmp_path / "catalog.parquet", rows_per_pair=2)  # 24 products
    report = cli_json_here(["catalog", "import", str(tmp_path / "catalog.parquet"), "--json"], env)
    assert report == {"rows": 24, "added": 24, "enriched": 24}

    footwear = cli_json_here(["search", "shoes", "--filter", "master_category=Footwear", "--k", "20", "--json"], env)
    assert len(footwear) == int((catalog["master_category"] == "Footwear").sum()) == 8
    assert {hit["master_category"] for hit in footwear} == {"Footwear"}  # the catalog's own labels
    assert all(hit["kind"] == "catalog" and hit["title"] for hit in footwear)

    red_or_blue = cli_json_here(["search", "a product", "--filter", "colour=Red", "--filter", "colour=Blue", "--k", "24",
                            "--json"], env)
    assert {hit["colour"] for hit in red_or_blue} == {"Red", "Blue"} and len(red_or_blue) == 12

    image = sorted((Path(env["GENSHOP_HOME"]) / "images").rglob("*.png"))[0]
    by_image = cli_json_here(["search", "--image", str(image), "--k", "1", "--json"], env)
    assert by_image[0]["score"] == pytest.approx(1.0, abs=1e-4) and Path(by_image[0]["image_path"]) == image

    before = index_files(env)
    assert cli_json_here(["catalog", "import", str(tmp_path / "catalog.parquet"), "--json"], env)["added"] == 0
    assert len(cli_json_here(["search", "a product", "--k", "100", "--json"], env)) == 24
    assert index_files(env).keys() == before.keys()


def test_bad_queries_are_refused_by_field_and_leave_the_index_untouched(tmp_path, models_dir, open_clip_dir):
    from genshop.embedding import EmbeddingConfig, load_embedder
    from genshop.enrichment import open_index
    from genshop.understanding.index import IndexInputError
    from genshop.understanding.search import QueryError, search

    env = enrich_env(tmp_path, models_dir, open_clip_dir)
    write_catalog(tmp_path / "catalog.parquet", rows_per_pair=1)
    cli_json_here(["catalog", "import", str(tmp_path / "catalog.parquet"), "--json"], env)
    before = index_files(env)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    huge, large = tmp_path / "huge.png", tmp_path / "large.png"
    Image.new("1", (20_000, 20_000)).save(huge)  # PIL itself refuses this one as a decompression bomb
    Image.new("1", (8_000, 6_000)).save(large)  # 48M pixels: over our limit, under PIL's
    index = open_index(Path(env["GENSHOP_HOME"]) / "index")
    embedder = load_embedder(EmbeddingConfig(backend="open_clip", model=str(open_clip_dir)))
    cases = [({"text": "   "}, "query: is empty"), ({}, "query: give a text query"),
             ({"image": empty}, "image: "), ({"image": corrupt}, "not a readable image"),
             ({"image": huge}, "is too large"), ({"image": large}, "is too large (8000x6000 pixels"),
             ({"text": "kurta", "k": 0}, "k: must be at least 1")]
    for arguments, message in cases:
        with pytest.raises(QueryError, match=re.escape(message)):
            search(index, embedder, **arguments)
    with pytest.raises(IndexInputError, match="filters"):
        search(index, embedder, "kurta", filters={"colour": 3})

    for args, message in [(["search", "   "], "Error: query: is empty"),
                          (["search", "--image", str(huge)], "is too large"),
                          (["search", "kurta", "--filter", "colour"], "--filter: expected FIELD=VALUE")]:
        proc = invoke_cli(args, env)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stdout, proc.stderr)
    assert index_files(env) == before


def test_with_a_product_vector_model_items_also_go_into_the_product_index(tmp_path, models_dir, open_clip_dir):
    from genshop.understanding.fusion import ProductFusion
    from tests.conftest import TINY_OPEN_CLIP

    understanding = ProductFusion(TINY_OPEN_CLIP["model_cfg"]["embed_dim"]).save_pretrained(tmp_path / "understanding")
    env = enrich_env(tmp_path, models_dir, open_clip_dir, GENSHOP_UNDERSTANDING=str(understanding))
    write_catalog(tmp_path / "catalog.parquet", rows_per_pair=1)  # 12 products
    cli_json_here(["catalog", "import", str(tmp_path / "catalog.parquet"), "--json"], env)
    by_category = cli_json_here(["search", "watches", "--category", "--k", "20", "--json"], env)
    by_image = cli_json_here(["search", "watches", "--k", "20", "--json"], env)
    assert sorted(h["id"] for h in by_category) == sorted(h["id"] for h in by_image) and len(by_category) == 12
    assert [h["id"] for h in by_category] != [h["id"] for h in by_image]  # a different vector ranks differently
    assert (Path(env["GENSHOP_HOME"]) / "index" / "products" / "manifest.json").is_file()


def test_the_enrich_stage_runs_a_stored_brief_through_a_vit_and_siglip(tmp_path, encoder_dir, open_clip_dir):
    """A brief's stored items (one image twice) embedded, categorized, titled, checked for near-duplicates and
    indexed by the open_clip ViT and by SigLIP; each encoder's understandings are its own."""
    import numpy as np

    from genshop.briefs import parse_brief
    from genshop.embedding import EmbeddingConfig
    from genshop.enrichment import EnrichConfig, enrich_brief, load_enricher, open_index
    from genshop.service import submit_brief
    from genshop.store import NewItem, Store
    from genshop.understanding.search import search

    store = Store(f"sqlite:///{tmp_path / 'genshop.db'}", tmp_path / "home")
    record, _ = submit_brief(store, parse_brief({"title": "Women's red kurta", "variants": 4}), "tiny-random")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    new_items = []
    for variant, picture in enumerate(pictures + pictures[:1]):  # the last item is the first one's image again
        sha, relative = store.images.put(picture)
        new_items.append(NewItem(brief_id=record.id, variant=variant, prompt="women's red kurta", negative_prompt="",
                                 seed=variant, steps=1, guidance_scale=1.0, width=48, height=40, model_id="test",
                                 model_revision="0", image_sha256=sha, image_path=relative, timings={}))
    store.add_items(new_items)
    ids = [item.id for item in store.list_items(record.id)]

    embedding = EmbeddingConfig.for_directory(encoder_dir)
    enricher = load_enricher(EnrichConfig(embedding=embedding, index_dir=tmp_path / "index"))
    understood = {u.item_id: u for u in enrich_brief(store, record.id, enricher)}
    assert sorted(understood) == sorted(ids)
    assert enricher.model_id.startswith(f"{encoder_dir.name}@")
    dim = enricher.embedder.embed_texts(["kurta"]).shape[1]
    for u in understood.values():
        assert u.embedding_model == enricher.model_id and u.title
        assert set(u.categories) == {"master_category", "sub_category", "article_type"}
        vector = np.frombuffer(u.embedding, dtype="<f4")
        assert vector.shape == (dim,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert understood[ids[3]].near_duplicate_of == ids[0]
    assert understood[ids[3]].near_duplicate_similarity == pytest.approx(1.0, abs=1e-4)

    index = open_index(tmp_path / "index")
    assert len(index) == 4 and index.config.dim == dim
    by_image = search(index, enricher.embedder, image=store.images.path(store.list_items(record.id)[1].image_path), k=1)
    assert by_image[0].id == ids[1] and by_image[0].score == pytest.approx(1.0, abs=1e-4)
    assert sorted(hit.id for hit in search(index, enricher.embedder, "red kurta", k=10)) == sorted(ids)
    assert enrich_brief(store, record.id, enricher) == list(understood.values())  # done once per model

    other = load_enricher(EnrichConfig(embedding=EmbeddingConfig.for_directory(open_clip_dir),
                                       index_dir=tmp_path / "resnet-index"))
    assert other.model_id != enricher.model_id
    assert {u.embedding_model for u in enrich_brief(store, record.id, other)} == {other.model_id}
    assert len(store.list_understandings(ids, enricher.model_id)) == 4
