"""The web gallery in a real browser (Debian's headless Chromium, driven by Playwright): sign in,
submit a brief through the form, watch its progress, see the images and scores appear."""

from __future__ import annotations

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
