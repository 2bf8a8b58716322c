"""Queue control (issue 20): priority at the front and fairness among designers through Celery's
priorities on Redis, pause / resume / clear without losing or repeating a brief, and designers'
picks as preference data; the store on SQLite and PostgreSQL, a real worker, the real API."""

from __future__ import annotations

import httpx
import pytest
import redis

from genshop.briefs import parse_brief
from genshop.queueing import clear, pause, queue_priority, queue_state, resume
from genshop.service import cancel_brief, enqueue_brief, submit_brief
from genshop.store import open_store
from tests.conftest import API_TOKENS, QUEUE_ADMIN, TEST_REDIS_URL, wait_for
from tests.test_store_and_generation import postgres_url, store  # noqa: F401 - fixtures

TINY = {"variants": 1, "steps": 1, "width": 16, "height": 16, "guidance_scale": 1.0}


def queued_messages(queue: str) -> dict[str, int]:
    """Generation messages waiting in Redis, by task id (every priority list of the queue)."""
    from workers.app import PRIORITY_SEPARATOR

    import json

    client = redis.Redis.from_url(TEST_REDIS_URL)
    found: dict[str, int] = {}
    for key in [queue] + [f"{queue}{PRIORITY_SEPARATOR}{p}" for p in range(1, 10)]:
        for raw in client.lrange(key, 0, -1):
            task_id = json.loads(raw)["headers"]["id"]
            found[task_id] = found.get(task_id, 0) + 1
    return found


def test_the_store_pauses_resumes_and_clears_and_a_start_never_runs_a_paused_brief(store):  # noqa: F811
    def submit(title: str, designer: str | None, priority: str = "normal"):
        return store.create_brief(parse_brief({"title": title, "priority": priority}), "tiny-random", designer)[0]

    x = [submit(f"x{n}", "x") for n in range(6)]
    y = submit("y", "y")
    front = submit("x front", "x", "high")
    places = [store.queue_place(record) for record in x]
    assert places == [0, 1, 2, 3, 4, 4] and store.queue_place(y) == 0 and store.queue_place(front) == 0
    assert [queue_priority(r.brief.priority, store.queue_place(r)) for r in (front, x[0], y, x[1], x[5])] == [0, 5, 5, 6, 9]

    assert {r.id for r in store.pause_queue("x")} == {r.id for r in x} | {front.id}
    assert store.get_brief(y.id).status == "queued"
    late = submit("x late", "x")
    assert late.status == "paused"  # submitted while the pause lasts: stored paused, never enqueued
    assert store.start_attempt(x[0].id, max_attempts=2).status == "paused"  # a message the pause missed: not run
    assert store.get_brief(x[0].id).attempts == 0
    assert [r.id for r in store.pause_queue(None)] == [y.id]  # the whole queue too
    assert store.queue_pauses() == ["all", "designer:x"]
    assert [r.id for r in store.resume_queue("x")] == []  # the whole-queue pause still covers x
    resumed = store.resume_queue(None)
    assert [r.id for r in resumed] == [r.id for r in x] + [y.id, front.id, late.id]  # oldest first
    assert {r.status for r in resumed} == {"queued"} and store.queue_pauses() == []

    store.pause_queue("x")
    store.start_attempt(x[1].id, max_attempts=2)  # queued → paused again: start_attempt parks it
    cleared = store.clear_queue("x")
    assert len(cleared) == 8 and {store.get_brief(r.id).status for r in cleared} == {"cancelled"}
    assert store.get_brief(y.id).status == "queued"
    store.resume_queue("x")
    assert store.count_briefs(("queued", "paused")) == 1


def test_high_goes_first_designers_take_turns_and_a_paused_designer_waits_then_runs_once(env, start_worker):
    """Submission order against execution order, one worker process: a front brief first, then each
    designer's first brief before anyone's second, and a paused designer's brief only once resumed."""
    from workers.app import check_broker, enqueue_generation, enqueue_new_brief, withdraw_generation_messages

    store = open_store()

    def submit(title: str, designer: str, **fields):
        record, _ = submit_brief(store, parse_brief({"title": title, "seed": 1, **TINY, **fields}), "tiny-random",
                                 designer)
        return enqueue_brief(store, record.id, enqueue_new_brief)

    order = [submit(f"xavier {n}", "xavier") for n in range(4)] + [submit("yara 0", "yara"),
                                                                   submit("zoe front", "zoe", priority="high")]
    waiting = submit("wim 0", "wim")
    assert pause(store, "wim", withdraw_generation_messages) == [waiting.id]
    assert f"generate-{waiting.id}" not in queued_messages(env["GENSHOP_QUEUE"])
    enqueue_generation(waiting.id)  # a message the pause could not withdraw (taken just then, say)

    worker = start_worker(env)
    wait_for(lambda: all(store.get_brief(r.id).status == "succeeded" for r in order), 120, 0.2, what="the six briefs")
    wait_for(lambda: f"[generate-{waiting.id}] ignored" in worker.log.read_text(), 30, 0.2,
             what="the stray message of the paused brief to be dropped")
    ran = sorted((store.get_brief(r.id) for r in order), key=lambda r: r.started_at)
    assert [r.title for r in ran] == ["zoe front", "xavier 0", "yara 0", "xavier 1", "xavier 2", "xavier 3"]
    assert (store.get_brief(waiting.id).status, store.get_brief(waiting.id).attempts) == ("paused", 0)

    assert resume(store, "wim", enqueue_generation, check_broker) == [waiting.id]
    done = wait_for(lambda: (r := store.get_brief(waiting.id)).is_terminal and r, 60, 0.2, what="the resumed brief")
    assert (done.status, done.attempts, len(store.list_items(waiting.id))) == ("succeeded", 1, 1)

    pause(store, None, withdraw_generation_messages)  # the whole queue: a brief submitted now waits
    held = submit("yara 1", "yara")
    assert held.status == "paused" and queue_state(store).paused_all and queued_messages(env["GENSHOP_QUEUE"]) == {}
    assert resume(store, None, enqueue_generation, check_broker) == [held.id]
    done = wait_for(lambda: (r := store.get_brief(held.id)).is_terminal and r, 60, 0.2, what="the held brief")
    assert (done.status, done.attempts) == ("succeeded", 1)
    assert all(store.get_brief(r.id).attempts == 1 and len(store.list_items(r.id)) == 1 for r in order)
    assert clear(store, "yara", withdraw_generation_messages) == []  # nothing left waiting


def test_a_high_brief_arriving_behind_prefetched_normal_ones_leads_the_next_group(env, start_worker):
    """Default gathering: a worker holds up to 2 x GENSHOP_GATHER_MAX messages, so briefs sent while
    it runs a long one wait in the worker, not in Redis. A front brief sent after nine of xavier's and
    one of yara's still leads the next group, and yara's brief is in it (not behind xavier's tail)."""
    from workers.app import enqueue_new_brief

    store = open_store()

    def submit(title: str, designer: str, **fields):
        record, _ = submit_brief(store, parse_brief({"title": title, "seed": 1, **TINY, **fields}), "tiny-random",
                                 designer)
        return enqueue_brief(store, record.id, enqueue_new_brief)

    start_worker(env)
    blocker = submit("blocker", "bea", steps=100, width=128, height=128, variants=4)  # far longer than the submits
    wait_for(lambda: store.get_brief(blocker.id).status == "running", 30, 0.02, what="the blocker to start")
    backlog = [submit(f"xavier {n}", "xavier") for n in range(9)] + [submit("yara 0", "yara"),
                                                                     submit("zoe front", "zoe", priority="high")]
    assert store.get_brief(blocker.id).status == "running"  # the backlog arrived while the worker was busy
    cancel_brief(store, blocker.id)  # stops at its next denoising step; the worker moves on to the backlog
    wait_for(lambda: all(store.get_brief(r.id).status == "succeeded" for r in backlog), 60, 0.1, what="the backlog")
    ran = {r.title: r for r in (store.get_brief(b.id) for b in backlog)}
    first = min(ran.values(), key=lambda r: r.started_at)
    assert first.title == "zoe front"
    assert ran["yara 0"].finished_at <= ran["xavier 8"].started_at  # a group of 8: zoe, x0, yara, x1..x5


def test_the_cli_submits_at_the_front_and_pauses_resumes_and_clears(env, tmp_path):
    import json

    from tests.conftest import invoke_cli, write_brief

    brief = write_brief(tmp_path / "b.json", **TINY)
    normal = json.loads(invoke_cli(["submit", str(brief), "--json"], env).stdout)
    front = json.loads(invoke_cli(["submit", str(brief), "--front", "--json"], env).stdout)
    assert (normal["brief"]["priority"], front["brief"]["priority"]) == ("normal", "high")
    client, queue = redis.Redis.from_url(TEST_REDIS_URL), env["GENSHOP_QUEUE"]
    from workers.app import PRIORITY_SEPARATOR

    assert [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)] == [front["task_id"]]  # step 0
    assert [json.loads(m)["headers"]["id"] for m in client.lrange(f"{queue}{PRIORITY_SEPARATOR}5", 0, -1)] == [
        normal["task_id"]]
    paused = json.loads(invoke_cli(["queue", "pause", "--json"], env).stdout)["paused"]
    assert paused == [normal["brief_id"], front["brief_id"]] and queued_messages(queue) == {}
    status = json.loads(invoke_cli(["queue", "status", "--json"], env).stdout)
    assert status == {"paused_all": True, "paused_designers": [], "queued": 0, "paused": 2}
    assert json.loads(invoke_cli(["queue", "resume", "--json"], env).stdout)["resumed"] == paused
    assert queued_messages(queue) == {normal["task_id"]: 1, front["task_id"]: 1}  # one message each, again
    assert json.loads(invoke_cli(["queue", "clear", "--json"], env).stdout)["cancelled"] == paused
    assert queued_messages(queue) == {}
    assert json.loads(invoke_cli(["status", front["brief_id"], "--json"], env).stdout)["status"] == "cancelled"


def api_client(api_service, designer: str) -> httpx.Client:
    server, _ = api_service
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_TOKENS[designer]}"}, timeout=30)


def test_pause_resume_and_clear_through_the_api_lose_nothing(api_service):
    erin, fay = api_client(api_service, "erin"), api_client(api_service, QUEUE_ADMIN)
    assert erin.post("/api/queue/pause", json={"scope": "all"}).status_code == 403  # not a queue admin
    assert erin.post("/api/queue/pause", json={"scope": "everything"}).json()["detail"][0]["loc"] == ["body", "scope"]
    paused = erin.post("/api/queue/pause", json={}).json()
    assert paused["queue"] == {"paused_all": False, "paused_designers": ["erin"], "queued": 0, "paused": 0}
    first = erin.post("/api/briefs", json={"title": "Erin's front brief", **TINY, "priority": "high"}).json()
    second = erin.post("/api/briefs", json={"title": "Erin's brief", **TINY}).json()
    assert (first["status"], first["brief"]["priority"], second["status"]) == ("paused", "high", "paused")
    assert erin.post("/api/briefs", json={"title": "one too many", **TINY}).status_code == 429  # paused count
    assert erin.get("/api/me").json()["queued"] == 2
    assert fay.post("/api/queue/pause", json={"scope": "all"}).json()["queue"]["paused_all"]
    assert [b["id"] for b in erin.get("/api/briefs", params={"status": "paused"}).json()] == [second["id"], first["id"]]
    # erin's own pause ends, but the whole queue's still holds her briefs; its end releases them
    assert erin.get("/api/queue").json()["paused_all"] and erin.post("/api/queue/resume", json={}).json()["brief_ids"] == []
    resumed = fay.post("/api/queue/resume", json={"scope": "all"}).json()
    assert resumed["brief_ids"] == [first["id"], second["id"]] and resumed["queue"]["paused_all"] is False
    for brief in (first, second):
        done = wait_for(lambda b=brief: (r := erin.get(f"/api/briefs/{b['id']}").json())["status"] in
                        ("succeeded", "failed", "cancelled") and r, 60, 0.2, what="a resumed brief")
        assert (done["status"], done["attempts"]) == ("succeeded", 1)

    erin.post("/api/queue/pause", json={})
    waiting = [erin.post("/api/briefs", json={"title": f"to clear {n}", **TINY}).json()["id"] for n in range(2)]
    cleared = erin.post("/api/queue/clear").json()
    assert cleared["brief_ids"] == waiting and cleared["queue"]["queued"] == cleared["queue"]["paused"] == 0
    assert {erin.get(f"/api/briefs/{b}").json()["status"] for b in waiting} == {"cancelled"}
    erin.post("/api/queue/resume", json={})


def test_picks_become_manual_impressions_that_tune_reads_and_variants_filter_and_sort(api_service, env):
    from genshop.families import family_of
    from genshop.pipelines import load_pipeline
    from genshop.tuning.tune import preference_rankings
    from reward.impressions import read_impressions
    from tests.conftest import invoke_cli

    erin = api_client(api_service, "erin")
    brief = erin.post("/api/briefs", json={"title": "Erin's blue shirt", "description": "striped", "groups": ["A", "B"],
                                           "variants": 4, "seed": 21, "steps": 2, "width": 16, "height": 16}).json()
    items = wait_for(lambda: len(got := erin.get(f"/api/briefs/{brief['id']}/items").json()) == 4 and
                     all(len(i["scores"]) == 2 for i in got) and got, 120, 0.3, what="four scored variants")
    score_a = {i["id"]: next(s["score"] for s in i["scores"] if s["group_id"] == "A") for i in items}

    def found(**params) -> dict:
        response = erin.get("/api/items", params={"text": "BLUE shirt", **params})
        assert response.status_code == 200, response.text
        return response.json()

    by_score = found(group="A", sort="score")
    assert by_score["total"] == 4 and [i["id"] for i in by_score["items"]] == sorted(score_a, key=score_a.get, reverse=True)
    assert [i["seed"] for i in found(seed=23)["items"]] == [23]
    assert found(model="lora:A")["total"] == 2 and found(model="base")["total"] == 2  # A's LoRA, base for B
    assert found(status="succeeded")["total"] == 4 and found(status="failed")["total"] == 0
    assert found(since="2999-01-01")["total"] == 0 and found(until="2999-01-01")["total"] == 4
    middle = sorted(score_a.values())[1]
    assert {i["id"] for i in found(group="A", min_score=middle)["items"]} == {k for k, v in score_a.items() if v >= middle}
    page = found(sort="seed", limit=3, offset=3)
    assert page["total"] == 4 and [i["seed"] for i in page["items"]] == [24]
    assert erin.get("/api/items", params={"sort": "score"}).json()["detail"][0]["loc"] == ["query", "group"]
    assert api_client(api_service, "bob").get("/api/items", params={"text": "Erin's"}).json()["total"] == 0

    best, worst, other, last = sorted(score_a, key=score_a.get, reverse=True)
    assert erin.put(f"/api/items/{best}/pick", json={"choice": "picked", "group": "A"}).json() == [
        {"group_id": "A", "choice": "picked"}]
    erin.put(f"/api/items/{worst}/pick", json={"choice": "rejected", "group": "A"})
    assert erin.put(f"/api/items/{other}/pick", json={"choice": "picked"}).json() == [  # every target group
        {"group_id": "A", "choice": "picked"}, {"group_id": "B", "choice": "picked"}]
    assert erin.put(f"/api/items/{other}/pick", json={"choice": None, "group": "A"}).json() == [
        {"group_id": "B", "choice": "picked"}]  # withdrawn for A
    for body, field in (({"choice": "liked"}, "choice"), ({"choice": "picked", "group": "Q"}, "group"),
                        ({"choice": "picked", "group": "A", "extra": 1}, "extra")):
        assert erin.put(f"/api/items/{last}/pick", json=body).json()["detail"][0]["loc"] == ["body", field]
    assert api_client(api_service, "bob").put(f"/api/items/{best}/pick", json={"choice": "picked"}).status_code == 404
    shown = erin.get(f"/api/briefs/{brief['id']}/items").json()
    assert {i["id"]: i["picks"] for i in shown}[best] == [{"group_id": "A", "choice": "picked"}]

    _, service_env = api_service
    out = env["GENSHOP_HOME"] + "/manual.parquet"
    exported = invoke_cli(["picks", "export", "--designer", "erin", "--out", out, "--json"], service_env)
    assert exported.returncode == 0, exported.stderr
    assert '"picks":3' in exported.stdout.replace(" ", "") and '"impressions":2' in exported.stdout.replace(" ", "")
    frame = read_impressions(out).set_index("group_id")
    paths = {i["id"]: i for i in shown}
    assert set(frame["source"]) == {"manual"} and frame.loc["A", "chosen"].endswith(paths[best]["image_sha256"] + ".png")
    assert len(frame.loc["A", "items"]) == 4 and len(frame.loc["B", "items"]) == 4  # the pick against the other three

    loaded = load_pipeline("tiny-random")
    rankings, latents = preference_rankings(family_of(loaded.pipeline), loaded.pipeline, [out], "A", 16, 16)
    assert len(rankings) == 3 and latents.shape[:2] == (3, 2)  # the pick preferred to each variant not picked
    desirable = preference_rankings(family_of(loaded.pipeline), loaded.pipeline, [out], "B", 16, 16, "kto")[0]
    assert sorted(r.labels[0] for r in desirable) == [-1.0, -1.0, -1.0, 1.0]
