"""The embedded default: `genshop demo` and `submit --local` need no Redis; presets and their errors."""

from __future__ import annotations

import sqlite3

import pytest
from PIL import Image

from genshop.presets import load_preset, preset_names
from tests.conftest import cli_json_here, free_port, invoke_cli, run_cli, write_brief


@pytest.mark.slow
def test_demo_runs_the_tour_and_writes_a_contact_sheet(env, tmp_path):
    """The embedded defaults (mini generator, the bundle's reward model, CLIP and group LoRAs), run
    from another folder: the demo's items go to its own store and index, the user's are left
    untouched; base and tuned side by side for two groups."""
    env = {k: v for k, v in env.items() if k not in ("GENSHOP_PRESET", "GENSHOP_REWARD_MODEL", "GENSHOP_EMBEDDING_MODEL")}
    env["GENSHOP_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_cli(["demo", "--out", str(tmp_path / "demo")], env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sheet = Image.open(tmp_path / "demo" / "contact-sheet.png")
    assert sheet.width > 500 and sheet.height > 7 * 128  # 3 tour rows, then base and tuned for A and for B
    db = sqlite3.connect(tmp_path / "demo" / "genshop.db")
    assert db.execute("select status, count(*) from briefs group by status").fetchall() == [("succeeded", 6)]
    assert db.execute("select count(*) from items").fetchone()[0] == 16 + 3 * 3
    # every variant scored for every target group of its brief: kurta 8 x (A, B), wallet 4 x A, shoes 4 x B,
    # and the tuned rows 3 x A, 3 x B, the bundle's first two LoRAs (the base row is scored for the contact sheet only)
    assert db.execute("select group_id, count(*) from scores group by group_id order by group_id").fetchall() == [
        ("A", 15), ("B", 15)]
    # the base row is the base model, each tuned row its group's LoRA from the bundle (GENSHOP_ADAPTERS unset)
    base, a, b = [db.execute("select model_id from items i join briefs b on i.brief_id = b.id where b.id = ?",
                             (brief_id,)).fetchall() for (brief_id,) in db.execute(
                                 "select id from briefs order by created_at").fetchall()[3:]]
    assert {m for (m,) in base} == {"genshop/assets/genshop-mini/pipeline"}
    assert {m for (m,) in a} == {"genshop/assets/genshop-mini/pipeline+lora:A"} and {m for (m,) in b} == {
        "genshop/assets/genshop-mini/pipeline+lora:B"}
    assert "contact sheet" in proc.stdout
    assert db.execute("select count(*) from understandings").fetchone()[0] == 25
    assert (tmp_path / "demo" / "index").is_dir()
    assert not (tmp_path / "home").exists(), "the demo wrote into the user's GENSHOP_HOME"
    # the results table shows each variant's scores and category, not only --json
    kurta = db.execute("select id from briefs where title like '%kurta%'").fetchone()[0]
    table = invoke_cli(["results", kurta], {**env, "GENSHOP_HOME": str(tmp_path / "demo")}).stdout
    assert table.count("A: +") + table.count("A: -") == 8 and "Kurtas (" in table, table


def test_submit_local_runs_in_process_without_redis(env, tmp_path):
    env = {**env, "GENSHOP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    submitted = cli_json_here(["submit", str(write_brief(tmp_path / "b.yaml", variants=3, seed=5)), "--local", "--json"],
                              env)
    assert submitted["status"] == "succeeded" and submitted["items_count"] == 3
    results = cli_json_here(["results", submitted["brief_id"], "--json"], env)
    assert [i["seed"] for i in results["items"]] == [5, 6, 7]


def test_submit_to_an_unreachable_broker_fails_and_stores_nothing(env, tmp_path):
    env = {**env, "GENSHOP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = run_cli(["submit", str(write_brief(tmp_path / "b.yaml")), "--json"], env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    db = sqlite3.connect(tmp_path / "home" / "genshop.db")
    assert db.execute("select count(*) from briefs").fetchone()[0] == 0


@pytest.mark.parametrize("preset", ["sd15", "sd-turbo", "sdxl-turbo", "sd35-medium", "flux-schnell"])
def test_real_presets_fail_offline_with_one_clear_line(env, tmp_path, preset):
    env = {**env, "GENSHOP_PRESET": preset, "HF_HUB_OFFLINE": "1", "GENSHOP_HOME": str(tmp_path / "h")}
    proc = run_cli(["submit", str(write_brief(tmp_path / "b.yaml", steps=1)), "--local"], env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert preset in lines[0] and "cannot be downloaded" in lines[0]
    assert not (tmp_path / "h" / "genshop.db").exists() or sqlite3.connect(tmp_path / "h" / "genshop.db").execute(
        "select count(*) from briefs").fetchone()[0] == 0


def test_every_shipped_preset_parses():
    assert {"tiny-random", "mini", "sd15", "sd-turbo", "sdxl", "sdxl-turbo", "sd35-medium", "flux-schnell", "tiny-sdxl",
            "tiny-sd3", "tiny-flux"} <= set(preset_names())
    for name in preset_names():
        preset = load_preset(name)
        assert preset.limits.min_size <= preset.defaults.width <= preset.limits.max_size


def test_unknown_preset_is_invalid_input(env, tmp_path):
    proc = invoke_cli(["submit", str(write_brief(tmp_path / "b.yaml")), "--local"], {**env, "GENSHOP_PRESET": "nope"})
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
