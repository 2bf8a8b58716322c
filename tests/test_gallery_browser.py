"""The web gallery in a real browser (Debian's headless Chromium, driven by Playwright): sign in,
submit a brief through the form, watch its progress, see the images and scores appear."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import API_TOKENS, ARTIFACTS

CHROMIUM = os.environ.get("GENSHOP_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, api_service):
    server, _ = api_service
    context = browser.new_context(base_url=server.url, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: errors.append(message.text)
            if "Content Security Policy" in message.text else None)  # the page keeps to its own CSP
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page, designer: str) -> None:
    page.goto("/")
    page.fill("#token", API_TOKENS[designer])
    page.click("#login-form button")
    page.wait_for_selector("#brief-form", state="visible")


def test_submit_a_brief_in_the_form_see_progress_images_and_group_scores(page):
    page.goto("/")
    page.fill("#token", "not-a-token")
    page.click("#login-form button")
    page.wait_for_selector("#login-error:has-text('not accepted')")
    sign_in(page, "dana")
    assert "dana" in page.inner_text("#who")

    form = "#brief-form"
    page.fill(f"{form} [name=title]", "Women's red ethnic kurta")
    page.fill(f"{form} [name=colour]", "Red")
    page.fill(f"{form} [name=groups]", "A, B")
    page.fill(f"{form} [name=variants]", "6")
    page.fill(f"{form} [name=steps]", "100")
    page.fill(f"{form} [name=seed]", "5")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#brief-view[data-brief-id]")

    # live progress: the bar moves while the worker denoises, then the brief succeeds
    page.wait_for_function("() => (p => p.value > 0 && p.value < p.max)(document.querySelector('#progress')) && "
                           "!document.querySelector('#cancel').hidden", timeout=60_000, polling=50)
    page.wait_for_selector("#brief-status.succeeded", timeout=120_000)
    assert page.eval_on_selector("#progress", "p => p.value === p.max")
    assert page.inner_text("#progress-text").startswith("variants 6/6")

    # six variants with their images loaded, group A's from its LoRA, and a score for each group
    page.wait_for_function("() => document.querySelectorAll('#variants .variant img').length === 6 && "
                           "[...document.querySelectorAll('#variants .variant img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
    page.wait_for_function("() => document.querySelectorAll('#variants .variant tr[data-group]').length === 12",
                           timeout=60_000)
    labels = page.locator("#variants .variant .images figure").all_inner_texts()
    assert labels == ["tuned A", "base"] * 3
    page.wait_for_function("() => [...document.querySelectorAll('#variants .variant')].every(v => v.querySelector('.chips'))",
                           timeout=60_000)
    assert page.locator("#briefs li").first.inner_text().startswith("Women's red ethnic kurta")

    # the same design for no group (base model only): back on the first brief, A's variants show base beside tuned
    page.fill(f"{form} [name=groups]", "")
    page.click(f"{form} button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#briefs li').length === 2")
    base_id = page.locator("#briefs li").first.get_attribute("data-brief-id")
    page.wait_for_selector(f"#brief-view[data-brief-id='{base_id}'] #brief-status.succeeded", timeout=120_000)
    page.locator("#briefs li").nth(1).click()
    page.wait_for_function("() => document.querySelectorAll('#variants .counterpart img').length === 3", timeout=30_000)
    pairs = [card.locator("figure").all_inner_texts() for card in page.locator("#variants .variant").all()]
    assert [len(p) for p in pairs] == [2, 1] * 3 and pairs[0] == ["tuned A", "base"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gallery-brief.png"), full_page=True)


def test_the_form_shows_field_errors_and_search_shows_results(page):
    sign_in(page, "dana")
    page.fill("#brief-form [name=title]", "Kurta")
    page.fill("#brief-form [name=variants]", "500")
    page.click("#brief-form button[type=submit]")
    page.wait_for_selector("#brief-errors li[data-field=variants]")
    assert page.eval_on_selector("#brief-form [name=variants]", "input => input.classList.contains('invalid')")

    page.fill("#search-form [name=q]", "red kurta")
    page.click("#search-form button")
    page.wait_for_selector("#hits .variant img")
    assert page.locator("#hits .variant").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "gallery-search.png"), full_page=True)


def test_sign_in_sets_an_httponly_cookie_the_page_cannot_read_and_sign_out_clears_it(page):
    sign_in(page, "dana")
    [cookie] = [c for c in page.context.cookies() if c["name"] == "genshop_token"]
    assert cookie["value"] == API_TOKENS["dana"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "genshop_token" not in page.evaluate("document.cookie")
    page.reload()  # the server's cookie keeps the designer signed in
    page.wait_for_selector("#brief-form", state="visible")
    assert "dana" in page.inner_text("#who")
    page.click("#sign-out")
    page.wait_for_selector("#login", state="visible")
    assert not [c for c in page.context.cookies() if c["name"] == "genshop_token"]
    page.reload()
    page.wait_for_selector("#login", state="visible")
    assert page.is_hidden("#app")


def test_the_gallery_submits_at_the_front_pauses_picks_and_browses(page, api_service):
    """The queue controls, the pick buttons and the browse filters, in the page; each checked against the API."""
    import httpx

    server, _ = api_service
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_TOKENS['carol']}"}, timeout=30)
    sign_in(page, "carol")
    page.click("#queue-pause")
    page.wait_for_selector("#queue-state[data-paused=true]")
    form = "#brief-form"
    page.fill(f"{form} [name=title]", "Men's green polo")
    page.fill(f"{form} [name=groups]", "A")
    page.fill(f"{form} [name=variants]", "3")
    page.fill(f"{form} [name=steps]", "2")
    page.fill(f"{form} [name=seed]", "40")
    page.check(f"{form} [name=front]")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#brief-status.paused")
    brief_id = page.get_attribute("#brief-view", "data-brief-id")
    assert api.get(f"/api/briefs/{brief_id}").json()["brief"]["priority"] == "high"
    page.wait_for_selector("#queue-state:has-text('1 paused')")
    page.click("#queue-resume")
    page.wait_for_selector("#queue-state[data-paused=false]")
    page.wait_for_selector("#brief-status.succeeded", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#variants .variant').length === 3", timeout=30_000)

    cards = page.locator("#variants .variant")
    cards.nth(0).locator("button[data-choice=picked]").click()  # for the brief's target group A
    page.wait_for_selector("#variants .variant[data-picks='A:picked']")
    cards.nth(1).locator(".pick-group").fill("B")
    cards.nth(1).locator("button[data-choice=rejected]").click()
    page.wait_for_selector("#variants .variant[data-picks='B:rejected']")
    cards.nth(2).locator(".pick-group").fill("no such group")
    cards.nth(2).locator("button[data-choice=picked]").click()
    page.wait_for_function("() => document.querySelectorAll('#variants .variant')[2].querySelector('.pick .error')"
                           ".textContent.startsWith('group')")
    marks = {i["variant"]: i["picks"] for i in api.get(f"/api/briefs/{brief_id}/items").json()}
    assert marks == {0: [{"group_id": "A", "choice": "picked"}], 1: [{"group_id": "B", "choice": "rejected"}], 2: []}

    browse = "#browse-form"
    page.fill(f"{browse} [name=text]", "green polo")
    page.select_option(f"{browse} [name=sort]", "seed")
    page.click(f"{browse} button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#found .variant').length === 3")
    seeds = page.locator("#found .variant figcaption").all_inner_texts()
    assert [int(s.split("seed ")[1].split(" ")[0]) for s in seeds] == [40, 41, 42]
    assert page.inner_text("#found-total") == "1–3 of 3"
    page.fill(f"{browse} [name=seed]", "41")
    page.click(f"{browse} button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#found .variant').length === 1")
    assert page.get_attribute("#found .variant", "data-picks") == "B:rejected"
    page.fill(f"{browse} [name=seed]", "")
    page.select_option(f"{browse} [name=sort]", "score")
    page.click(f"{browse} button[type=submit]")
    page.wait_for_selector("#browse-error:has-text('group')")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gallery-queue-picks-browse.png"), full_page=True)


def test_the_gallery_shows_the_latest_audit_and_explains_a_variants_scores(page, api_service, tmp_path):
    import httpx

    from reward.synthetic import write_synthetic_catalog
    from tests.conftest import invoke_cli

    server, env = api_service
    sign_in(page, "carol")
    page.click("#audit-kinds [data-kind=generator]")  # none yet: the view says how to make one
    page.wait_for_selector("#audit-notes:has-text('run `genshop audit generator`')")
    assert page.is_hidden("#audit-chart")

    # a reward audit, written where `genshop serve` reads the latest one
    catalog = write_synthetic_catalog(tmp_path / "catalog.parquet", 80, seed=5)
    done = invoke_cli(["audit", "reward", "--catalog", str(catalog), "--top-share", "0.5", "--json"], env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    page.click("#audit-kinds [data-kind=reward]")
    page.wait_for_function("() => (img => !img.hidden && img.complete && img.naturalWidth > 0)"
                           "(document.querySelector('#audit-chart'))", timeout=30_000)
    assert "80 catalog items" in page.inner_text("#audit-summary")
    assert page.locator("#audit-disparities tr[data-attribute]").count() == min(20, len(report["disparities"]))
    assert page.inner_text("#audit-notes") == " ".join(report["notes"])

    # a brief for groups A and B: once scored, "Why these scores?" says what each group's reward rests on
    form = "#brief-form"
    page.fill(f"{form} [name=title]", "Women's red kurta")
    page.fill(f"{form} [name=groups]", "A, B")
    page.fill(f"{form} [name=variants]", "2")
    page.fill(f"{form} [name=steps]", "2")
    page.click(f"{form} button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#variants .variant button.explain').length === 2",
                           timeout=120_000)
    page.locator("#variants .variant button.explain").first.click()
    page.wait_for_selector("#variants .variant .explanations li[data-group=B]", timeout=60_000)
    lines = page.locator("#variants .variant .explanations li").all_inner_texts()
    assert [line.split(":")[0] for line in lines] == ["for group A", "for group B"]
    assert all(any(f"{a} " in line for a in ("colour", "usage", "gender", "article type")) for line in lines)
    page.wait_for_timeout(1500)  # the gallery re-renders the cards as it polls: the explanation stays
    assert page.locator("#variants .variant .explanations li").count() == 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gallery-audit.png"), full_page=True)

    item_id = page.locator("#variants .variant").first.get_attribute("data-item-id")
    own = httpx.get(f"{server.url}/api/items/{item_id}/explanations", timeout=60,
                    headers={"Authorization": f"Bearer {API_TOKENS['carol']}"})
    items = httpx.get(f"{server.url}/api/briefs/{page.get_attribute('#brief-view', 'data-brief-id')}/items",
                      headers={"Authorization": f"Bearer {API_TOKENS['carol']}"}).json()
    scores = {s["group_id"]: s["score"] for s in next(i for i in items if i["id"] == item_id)["scores"]}
    # the stored score (scored in a batch) and the explanation's reward (this image alone): equal up to float kernels
    assert {e["group_id"]: e["reward"] for e in own.json()} == pytest.approx(scores, abs=1e-3)
    other = httpx.get(f"{server.url}/api/items/{item_id}/explanations",
                      headers={"Authorization": f"Bearer {API_TOKENS['bob']}"})
    assert other.status_code == 404  # another designer's item does not exist for them


def test_a_best_of_n_variant_shows_its_rank_and_the_other_candidates_scores(page, api_service):
    import httpx

    from tests.test_api import wait_finished

    server, _ = api_service
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_TOKENS['dana']}"}, timeout=30)
    created = api.post("/api/briefs", json={"title": "Men's blue shirt", "variants": 2, "best_of": 3, "seed": 3,
                                            "steps": 2, "groups": ["B"]})
    assert created.status_code == 201, created.text
    assert wait_finished(api, created.json()["id"])["status"] == "succeeded"
    picks = [item["best_of"] for item in api.get(f"/api/briefs/{created.json()['id']}/items").json()]
    sign_in(page, "dana")
    page.locator(f"#briefs li[data-brief-id='{created.json()['id']}']").click()
    page.wait_for_function("() => document.querySelectorAll('#variants .variant .best-of').length === 2",
                           timeout=30_000)
    for card, pick in zip(page.locator("#variants .variant .best-of").all(), picks):
        others = [f"{s:.3f}" for c, s in enumerate(pick["scores"]) if c != pick["kept"]]
        assert card.inner_text().startswith(f"best of 3 · rank 1 ({max(pick['scores']):.3f})")
        assert card.locator(".candidate").all_inner_texts() == others
