"""The designers' HTTP API: the real app (`genshop serve`) over HTTP, with a real worker on Redis."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import API_TOKENS, wait_for

LONG = {"variants": 16, "steps": 100, "width": 128, "height": 128}  # seconds of denoising, even on a fast machine


def client(api_service, designer: str | None = "alice") -> httpx.Client:
    server, _ = api_service
    headers = {"Authorization": f"Bearer {API_TOKENS[designer]}"} if designer else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def wait_finished(api: httpx.Client, brief_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (b := api.get(f"/api/briefs/{brief_id}").json())["status"] in
                    ("succeeded", "failed", "cancelled") and b, timeout, 0.2, what=f"brief {brief_id} to finish")


@pytest.fixture(scope="module")
def finished(api_service):
    """Alice's brief for groups A and B, and the same design untargeted (the base model only),
    both generated, scored and enriched."""
    api = client(api_service)
    design = {"title": "Women's red kurta", "variants": 4, "seed": 11, "steps": 4}
    tuned = api.post("/api/briefs", json={**design, "groups": ["A", "B"]})
    base = api.post("/api/briefs", json=design)
    assert tuned.status_code == 201 and base.status_code == 201, (tuned.text, base.text)
    briefs = {}
    for name, response in (("tuned", tuned), ("base", base)):
        briefs[name] = wait_finished(api, response.json()["id"])
        assert briefs[name]["status"] == "succeeded", briefs[name]["error"]

    def complete():
        items = api.get(f"/api/briefs/{briefs['tuned']['id']}/items").json()
        return all(len(i["scores"]) == 2 and i["understanding"] for i in items) and items
    items = wait_for(complete, 90, 0.5, what="scores for groups A and B and the understanding of every item")
    return briefs, items


def test_no_token_or_an_unknown_token_is_401_and_the_schema_needs_one_the_gallery_is_public(api_service):
    anonymous = client(api_service, None)
    for path in ("/api/me", "/api/briefs", "/api/search?q=kurta"):
        response = anonymous.get(path)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
    assert anonymous.post("/api/briefs", json={"title": "x"}).status_code == 401
    wrong = anonymous.get("/api/me", headers={"Authorization": "Bearer token-alicex"})
    assert wrong.status_code == 401
    for path in ("/openapi.json", "/docs"):  # GENSHOP_API_PUBLIC_DOCS is off by default
        assert anonymous.get(path).status_code == 401, path
    assert "swagger" in client(api_service, "bob").get("/docs").text.lower()
    anonymous.cookies.set("genshop_token", API_TOKENS["bob"])  # the cookie POST /api/session sets
    assert anonymous.get("/api/me").json()["designer"] == "bob"

    schema = anonymous.get("/openapi.json").json()
    assert {"/api/briefs", "/api/briefs/{brief_id}", "/api/briefs/{brief_id}/cancel", "/api/briefs/{brief_id}/items",
            "/api/search", "/api/exports"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert schema["paths"]["/api/briefs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"] \
        .endswith("/Brief")
    page = anonymous.get("/")
    assert page.status_code == 200 and 'id="brief-form"' in page.text


def test_bad_briefs_are_422_by_field_oversize_bodies_413_and_nothing_is_stored(api_service):
    api = client(api_service, "bob")
    before = api.get("/api/briefs").json()
    response = api.post("/api/briefs", json={"title": "", "variants": 0, "colour": 3, "wings": True})
    assert response.status_code == 422
    fields = {tuple(error["loc"]) for error in response.json()["detail"]}
    assert fields == {("body", "title"), ("body", "variants"), ("body", "colour"), ("body", "wings")}
    preset_limit = api.post("/api/briefs", json={"title": "Red kurta", "width": 12, "steps": 120})
    assert preset_limit.status_code == 422
    assert {tuple(e["loc"]) for e in preset_limit.json()["detail"]} >= {("body", "width"), ("body", "steps")}
    not_json = api.post("/api/briefs", content=b"title: kurta", headers={"content-type": "application/json"})
    assert not_json.status_code == 422

    oversize = b'{"title": "' + b"a" * 70_000 + b'"}'
    declared = api.post("/api/briefs", content=oversize, headers={"content-type": "application/json"})
    streamed = api.post("/api/briefs", content=iter([oversize[:40_000], oversize[40_000:]]),
                        headers={"content-type": "application/json"})  # chunked: no Content-Length
    assert declared.status_code == 413 and streamed.status_code == 413, (declared.text, streamed.text)
    assert api.get("/api/briefs").json() == before


def test_a_brief_generates_with_progress_group_scores_attributes_images_and_base_vs_tuned_pairs(api_service,
                                                                                               finished):
    briefs, items = finished
    api = client(api_service)
    tuned = briefs["tuned"]
    assert tuned["progress"]["variants_done"] == tuned["progress"]["variants_total"] == 4
    assert [item["variant"] for item in items] == [0, 1, 2, 3]
    for item in items:
        assert {s["group_id"] for s in item["scores"]} == {"A", "B"}
        assert set(item["understanding"]["categories"]) == {"master_category", "sub_category", "article_type"}
        image = api.get(item["image_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (item["width"], item["height"])
        # groups take turns: A's variants (0, 2) come from A's LoRA and pair with the base brief's same designs;
        # B has no LoRA, so its variants are base-model images with no other model's version to compare
        if item["variant"] % 2 == 0:
            assert item["model_id"].endswith("+lora:A")
            [pair] = item["counterparts"]
            assert pair["brief_id"] == briefs["base"]["id"] and "+lora:" not in pair["model_id"]
            assert api.get(pair["image_url"]).content != image.content
        else:
            assert "+lora:" not in item["model_id"] and item["counterparts"] == []
    listed = [b["id"] for b in api.get("/api/briefs").json()]
    assert listed[:2] == [briefs["base"]["id"], tuned["id"]]  # newest first
    assert [b["id"] for b in api.get("/api/briefs", params={"limit": 1, "offset": 1}).json()] == [tuned["id"]]
    assert [b["id"] for b in api.get("/api/briefs", params={"status": "succeeded"}).json()] == listed
    assert api.get("/api/briefs", params={"limit": 0}).status_code == 422


def test_a_designer_sees_only_their_own_briefs_items_and_search_hits(api_service, finished):
    briefs, items = finished
    alice, bob = client(api_service), client(api_service, "bob")
    brief_id = briefs["tuned"]["id"]
    for path in (f"/api/briefs/{brief_id}", f"/api/briefs/{brief_id}/items", items[0]["image_url"]):
        assert bob.get(path).status_code == 404, path
    assert bob.post(f"/api/briefs/{brief_id}/cancel").status_code == 404
    assert brief_id not in {b["id"] for b in bob.get("/api/briefs").json()}
    assert bob.post("/api/exports", json={"brief_ids": [brief_id], "arms": [
        {"name": "base", "selector": "generated"}, {"name": "again", "selector": "generated"}]}).status_code == 404

    own = {item["id"] for item in items}
    hits = alice.get("/api/search", params={"q": "women's red kurta", "k": 20}).json()
    assert own <= {hit["id"] for hit in hits} and all(hit["kind"] == "generated" for hit in hits)
    assert not own & {hit["id"] for hit in bob.get("/api/search", params={"q": "women's red kurta"}).json()}


def test_search_by_image_upload_and_bad_queries_are_422_by_field(api_service, finished):
    _, items = finished
    api = client(api_service)
    png = api.get(items[1]["image_url"]).content
    hits = api.post("/api/search", files={"image": ("query.png", png, "image/png")}, data={"k": "3"}).json()
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3) and len(hits) == 3
    # the same picture is among the best: the tiny random CLIP embeds some other noise images of
    # the shared service just as close (cosine 1 within float error), so ties are not ordered
    hits = api.post("/api/search", files={"image": ("query.png", png, "image/png")}, data={"k": "50"}).json()
    best = [h for h in hits if h["score"] >= 1.0 - 1e-3]
    assert any(api.get(h["image_url"]).content == png for h in best), [h["score"] for h in hits[:5]]

    empty = api.post("/api/search", files={"image": ("empty.png", b"", "image/png")})
    garbage = api.post("/api/search", files={"image": ("x.png", b"not an image", "image/png")})
    for response in (empty, garbage):
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "image"]
    assert "the upload" in empty.json()["detail"][0]["msg"]
    assert api.get("/api/search", params={"q": ""}).json()["detail"][0]["loc"] == ["query", "q"]
    assert api.get("/api/search", params={"q": "   "}).json()["detail"][0]["loc"] == ["query", "q"]
    assert api.get("/api/search", params={"q": "kurta", "k": 0}).status_code == 422


def test_export_trigger_writes_the_ab_listings_of_the_designers_briefs(api_service, finished):
    briefs, items = finished
    server, env = api_service
    api = client(api_service)
    ids = [briefs["base"]["id"], briefs["tuned"]["id"]]
    bad = api.post("/api/exports", json={"brief_ids": ids, "arms": [{"name": "only", "selector": "generated"}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "arms"]
    tuned_model = items[0]["model_id"]
    response = api.post("/api/exports", json={"brief_ids": ids, "format": "csv", "salt": "s1", "arms": [
        {"name": "base", "selector": f"model:{tuned_model.split('+lora:')[0]}"},
        {"name": "tuned", "selector": f"model:{tuned_model}"}]})
    assert response.status_code == 201, response.text
    manifest = response.json()
    assert {arm["name"]: arm["listings"] for arm in manifest["arms"]} == {"base": 6, "tuned": 2}
    folder = Path(env["GENSHOP_HOME"]) / "exports" / manifest["experiment_id"]
    assert (folder / "manifest.json").is_file() and (folder / "listings.csv").is_file()


def test_queued_briefs_are_limited_per_designer_and_a_running_brief_cancels(api_service):
    carol, bob = client(api_service, "carol"), client(api_service, "bob")
    running = carol.post("/api/briefs", json={"title": "Men's black wallet", **LONG}).json()
    wait_for(lambda: carol.get(f"/api/briefs/{running['id']}").json()["status"] == "running", 60, 0.2,
             what="the long brief to start")
    queued = [carol.post("/api/briefs", json={"title": f"Wallet {n}", "variants": 1}) for n in range(2)]
    assert [r.status_code for r in queued] == [201, 201]
    refused = carol.post("/api/briefs", json={"title": "Wallet 3", "variants": 1})
    assert refused.status_code == 429 and "limit is 2" in refused.json()["detail"]
    assert len(carol.get("/api/briefs").json()) == 3  # the refused brief was not stored
    assert carol.get("/api/me").json() == {"designer": "carol", "queued": 2, "max_queued": 2}
    other = bob.post("/api/briefs", json={"title": "Wallet for bob", "variants": 1})
    assert other.status_code == 201  # the limit is per designer

    for response in queued:  # still queued behind the long brief: cancelled at once
        assert carol.post(f"/api/briefs/{response.json()['id']}/cancel").json()["status"] == "cancelled"
    cancelled = carol.post(f"/api/briefs/{running['id']}/cancel").json()
    assert cancelled["cancel_requested"] is True
    assert wait_finished(carol, running["id"], 60)["status"] == "cancelled"
    assert wait_finished(bob, other.json()["id"], 60)["status"] == "succeeded"


def test_tokens_come_from_a_yaml_file_and_the_variable_and_serve_refuses_to_start_without_any(env, tmp_path):
    from genshop.settings import get_settings
    from tests.conftest import invoke_cli

    refused = invoke_cli(["serve"], env)
    assert refused.returncode == 1 and "no API tokens" in refused.stderr

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("ana: from-file\nben: from-file\n")
    get_settings.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENSHOP_API_TOKENS_FILE", str(tokens))
        patch.setenv("GENSHOP_API_TOKENS", "ben:from-variable, cy:x")
        settings = get_settings()
        assert {d: t.get_secret_value() for d, t in settings.api_tokens.items()} == \
            {"ana": "from-file", "ben": "from-variable", "cy": "x"}
        assert "from-file" not in repr(settings)
        get_settings.cache_clear()
        patch.setenv("GENSHOP_API_TOKENS", "ben-without-a-token")
        with pytest.raises(ValueError, match="GENSHOP_API_TOKENS: 'ben-without-a-token'"):
            get_settings()
        patch.setenv("GENSHOP_API_TOKENS", "ben/../x:token")
        with pytest.raises(ValueError, match="designer names must be"):
            get_settings()
    get_settings.cache_clear()


def test_a_broker_that_is_down_is_503_and_the_brief_is_not_kept(tmp_path, models_dir):
    from tests.conftest import ApiServer, free_port, make_env

    env = make_env(tmp_path / "home", models_dir, GENSHOP_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
                   GENSHOP_API_TOKENS=f"alice:{API_TOKENS['alice']}")
    server = ApiServer(env, tmp_path / "server.log").wait_ready()
    try:
        api = client((server, env))
        response = api.post("/api/briefs", json={"title": "Red kurta", "variants": 1})
        assert response.status_code == 503 and "nothing was stored" in response.json()["detail"]
        assert api.get("/api/briefs").json() == [] and api.get("/api/me").json()["queued"] == 0
    finally:
        server.stop()


# -- issue 17: faults, backlog and hostile input ---------------------------------------------------
def _post_raw(api: httpx.Client, path: str, text: str) -> httpx.Response:
    return api.post(path, content=text.encode(), headers={"content-type": "application/json"})


def test_nan_and_infinity_in_a_brief_are_422_naming_the_field_and_nothing_is_stored(api_service):
    api = client(api_service, "bob")
    before = api.get("/api/briefs").json()
    for literal in ("NaN", "Infinity", "-Infinity"):
        for field in ("guidance_scale", "width"):
            response = _post_raw(api, "/api/briefs", f'{{"title": "Red kurta", "{field}": {literal}}}')
            assert response.status_code == 422, (field, literal, response.text)
            assert [e["loc"] for e in response.json()["detail"]] == [["body", field]], response.text
    both = _post_raw(api, "/api/briefs", '{"title": "Red kurta", "guidance_scale": NaN, "width": -Infinity}')
    assert {tuple(e["loc"]) for e in both.json()["detail"]} == {("body", "guidance_scale"), ("body", "width")}
    nul = api.post("/api/briefs", json={"title": "Red\u0000kurta", "client_reference": "r\u0000"})
    assert {tuple(e["loc"]) for e in nul.json()["detail"]} == {("body", "title"), ("body", "client_reference")}
    for path in ("/api/briefs/%00", "/api/briefs/" + "a" * 300, "/api/items/%00/image"):
        assert api.get(path).status_code == 404, path
    assert api.get("/api/briefs").json() == before


def test_offsets_past_64_bits_or_in_exponent_form_are_422(api_service):
    api = client(api_service, "bob")
    for offset in ("9223372036854775808", "1e20", str(2**70), "-1"):
        response = api.get("/api/briefs", params={"offset": offset})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "offset"], \
            (offset, response.text)
    assert api.get("/api/briefs", params={"offset": 1_000_000_000}).json() == []


def _png_bomb(chunk_type: bytes) -> bytes:
    """A 4x4 PNG (about 65 KB) whose zTXt or iCCP chunk inflates to 64 MB."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, "PNG")
    png = buffer.getvalue()
    payload = (b"Comment\0\0" if chunk_type == b"zTXt" else b"icc\0\0") + zlib.compress(b"\0" * (64 << 20), 9)
    chunk = struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))
    return png[:33] + chunk + png[33:]  # right after the IHDR chunk


def test_png_bombs_and_hostile_upload_filenames_are_422_on_the_image_field_or_ignored(api_service, finished):
    _, items = finished
    api = client(api_service)
    for chunk_type in (b"zTXt", b"iCCP"):
        bomb = _png_bomb(chunk_type)
        assert len(bomb) < 70_000
        response = api.post("/api/search", files={"image": ("bomb.png", bomb, "image/png")})
        assert response.status_code == 422, (chunk_type, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", "image"]
    png = api.get(items[1]["image_url"]).content
    for name in ("query." + "x" * 300, "query\0.png", "../../etc/passwd", "x" * 1000 + ".png"):
        response = api.post("/api/search", files={"image": (name, png, "image/png")}, data={"k": "1"})
        assert response.status_code == 200, (name[:40], response.text)
        assert response.json()[0]["score"] == pytest.approx(1.0, abs=1e-3)
    # a part header over the multipart parser's limit is refused before the route runs
    assert api.post("/api/search", files={"image": ("x" * 20_000, png, "image/png")}).status_code == 400


def test_exports_refuse_repeated_arm_names_and_weights_that_are_not_finite_or_too_large(api_service):
    server, env = api_service
    api = client(api_service, "bob")
    exports = Path(env["GENSHOP_HOME"]) / "exports"
    before = sorted(exports.iterdir()) if exports.exists() else []
    arms = '[{"name": "a", "selector": "generated", "weight": %s}, {"name": "b", "selector": "generated"}]'
    for weight in ("Infinity", "NaN", "1e308", "-1", "0"):
        response = _post_raw(api, "/api/exports", '{"brief_ids": ["x"], "arms": %s}' % (arms % weight))
        assert response.status_code == 422, (weight, response.text)
        assert response.json()["detail"][0]["loc"][:3] == ["body", "arms", 0], response.text
    twice = api.post("/api/exports", json={"brief_ids": ["x"], "arms": [
        {"name": "same", "selector": "generated"}, {"name": "same", "selector": "catalog"}]})
    assert twice.status_code == 422 and twice.json()["detail"][0]["loc"] == ["body", "arms"], twice.text
    assert "'same'" in twice.json()["detail"][0]["msg"]
    assert (sorted(exports.iterdir()) if exports.exists() else []) == before


def test_every_answer_has_the_security_headers_and_api_json_is_not_cached(api_service, finished):
    _, items = finished
    api, anonymous = client(api_service), client(api_service, None)
    answers = {"me": api.get("/api/me"), "401": anonymous.get("/api/me"), "422": api.get("/api/briefs?limit=0"),
               "413": _post_raw(api, "/api/briefs", '{"title": "' + "a" * 70_000 + '"}'),
               "image": api.get(items[0]["image_url"]), "page": anonymous.get("/"),
               "script": anonymous.get("/static/gallery.js"), "docs": api.get("/docs")}
    assert [a.status_code for a in answers.values()] == [200, 401, 422, 413, 200, 200, 200, 200]
    for name, answer in answers.items():
        headers = answer.headers
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert "frame-ancestors 'none'" in headers["content-security-policy"], name
    assert "script-src 'self';" in answers["page"].headers["content-security-policy"]
    for name in ("me", "401", "422", "413"):
        assert answers[name].headers["cache-control"] == "no-store", name
    assert "immutable" in answers["image"].headers["cache-control"]


def test_the_session_route_sets_an_httponly_strict_cookie_and_sign_out_clears_it(api_service):
    anonymous = client(api_service, None)
    refused = anonymous.post("/api/session", json={"token": "not-a-token"})
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    assert anonymous.post("/api/session", json={"token": ""}).status_code == 422
    signed_in = anonymous.post("/api/session", json={"token": API_TOKENS["dana"]})
    assert signed_in.status_code == 200 and signed_in.json()["designer"] == "dana"
    cookie = signed_in.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert cookie.startswith(f"genshop_token={API_TOKENS['dana']};")
    assert {"httponly", "path"} <= attributes and "samesite=strict" in cookie.lower() and "secure" not in attributes
    assert anonymous.get("/api/me").json()["designer"] == "dana"  # the cookie now signs the client in
    behind_tls = client(api_service, None).post("/api/session", json={"token": API_TOKENS["dana"]},
                                                headers={"x-forwarded-proto": "https"})  # a TLS proxy on localhost
    assert "secure" in {part.strip().lower() for part in behind_tls.headers["set-cookie"].split(";")}
    signed_out = anonymous.delete("/api/session")
    assert signed_out.status_code == 204 and 'genshop_token=""' in signed_out.headers["set-cookie"]
    assert anonymous.get("/api/me").status_code == 401
    bearer = client(api_service, "dana")  # tokens as Bearer work as before
    assert bearer.get("/api/me").json()["designer"] == "dana"


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory, models_dir):
    """`genshop serve` with no worker (briefs stay queued), a limit of 10, public docs and Secure cookies."""
    from tests.conftest import ApiServer, make_env

    home = tmp_path_factory.mktemp("idle-home")
    designers = {f"racer{n}": f"token-racer{n}" for n in range(4)}
    env = make_env(home, models_dir, GENSHOP_API_MAX_QUEUED="10", GENSHOP_API_PUBLIC_DOCS="true",
                   GENSHOP_API_COOKIE_SECURE="true",
                   GENSHOP_API_TOKENS=",".join(f"{d}:{t}" for d, t in designers.items()))
    server = ApiServer(env, home / "server.log").wait_ready()
    yield server, env, designers
    server.stop()
    import redis

    from tests.conftest import TEST_REDIS_URL
    redis.Redis.from_url(TEST_REDIS_URL).delete(env["GENSHOP_QUEUE"])


def test_concurrent_submits_never_pass_the_queued_limit(idle_server):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    server, _, designers = idle_server
    for designer, token in designers.items():  # four runs of 40 submits at once against a limit of 10
        barrier = threading.Barrier(40)
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                           limits=httpx.Limits(max_connections=40))

        def submit(n: int) -> int:
            barrier.wait()
            return api.post("/api/briefs", json={"title": f"Race {n}", "variants": 1}).status_code

        with ThreadPoolExecutor(40) as pool:
            codes = list(pool.map(submit, range(40)))
        assert sorted(codes) == [201] * 10 + [429] * 30, (designer, codes)
        assert api.get("/api/me").json()["queued"] == 10 and len(api.get("/api/briefs").json()) == 10
        api.close()


def test_docs_can_be_public_and_cookies_always_secure_by_setting(idle_server):
    server, _, designers = idle_server
    anonymous = httpx.Client(base_url=server.url, timeout=30)
    assert anonymous.get("/openapi.json").json()["info"]["title"] == "GenShop"
    assert anonymous.get("/docs").status_code == 200
    assert anonymous.get("/api/me").status_code == 401  # the API itself still needs a token
    signed_in = anonymous.post("/api/session", json={"token": designers["racer0"]})
    assert "secure" in {part.strip().lower() for part in signed_in.headers["set-cookie"].split(";")}


@pytest.fixture
def postgres_store(tmp_path):
    import os
    import uuid

    import psycopg

    from genshop.store import Store

    admin_url = os.environ.get("GENSHOP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"genshop_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    store = Store(admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}",
                  tmp_path / "files")
    yield store
    store.engine.dispose()
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_queued_limit_holds_under_concurrency_on_postgresql_too(postgres_store):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from genshop.briefs import parse_brief
    from genshop.store import QueueLimitError

    for run in range(3):
        barrier = threading.Barrier(40)

        def submit(n: int) -> bool:
            barrier.wait()
            try:
                postgres_store.create_brief(parse_brief({"title": f"Race {n}"}), "tiny-random", f"pg{run}", 10)
                return True
            except QueueLimitError:
                return False

        with ThreadPoolExecutor(40) as pool:
            assert sum(pool.map(submit, range(40))) == 10
        assert postgres_store.count_briefs("queued", f"pg{run}") == 10
