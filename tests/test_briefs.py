"""Brief validation: every class of bad input exits 2, names the field, stores and enqueues nothing."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from genshop.briefs import MAX_BRIEF_FILE_BYTES, BriefError, load_brief_file, parse_brief, resolve_brief
from genshop.presets import load_preset
from tests.conftest import invoke_cli, run_cli


def fields_of(error: BriefError) -> set[str]:
    return {issue.field for issue in error.issues}


def test_valid_brief_yaml_round_trip(tmp_path):
    path = tmp_path / "brief.yaml"
    path.write_text("title: Women's red ethnic kurta\ncolour: Red\ngroups: [A, B]\nvariants: 8\nguidance_scale: 7\n")
    brief = load_brief_file(path)
    assert (brief.title, brief.colour, brief.groups, brief.variants, brief.guidance_scale) == (
        "Women's red ethnic kurta", "Red", ["A", "B"], 8, 7.0)


@pytest.mark.parametrize("data, field", [
    ({"title": "x", "sizes": [1]}, "sizes"),
    ({"title": "x", "variants": "8"}, "variants"),
    ({"title": "x", "variants": 65}, "variants"),
    ({"title": "x", "variants": 0}, "variants"),
    ({"title": "   "}, "title"),
    ({"description": "no title"}, "title"),
    ({"title": "x", "seed": -1}, "seed"),
    ({"title": "x", "seed": True}, "seed"),
    ({"title": "x", "guidance_scale": 99.0}, "guidance_scale"),
    ({"title": "x", "groups": ["A", "A"]}, "groups"),
    ({"title": "x", "groups": ["bad id!"]}, "groups.0"),
])
def test_schema_names_the_offending_field(data, field):
    with pytest.raises(BriefError) as info:
        parse_brief(data)
    assert field in fields_of(info.value)


def test_every_offending_field_is_reported_at_once():
    with pytest.raises(BriefError) as info:
        parse_brief({"title": "", "variants": 100, "colur": "Red"})
    assert fields_of(info.value) == {"title", "variants", "colur"}


def test_resolve_fills_defaults_pins_a_seed_and_checks_model_limits():
    preset = load_preset("tiny-random")
    resolved = resolve_brief(parse_brief({"title": "x"}), preset)
    assert resolved.steps == preset.defaults.steps and resolved.width == preset.defaults.width
    assert resolved.seed is not None
    with pytest.raises(BriefError) as info:
        resolve_brief(parse_brief({"title": "x", "width": 1024, "height": 36, "steps": 101}), preset)
    assert fields_of(info.value) == {"width", "height", "steps"}


BAD_FILES = {
    "unknown-field.yaml": (b"title: kurta\nvarients: 8\n", "varients"),
    "wrong-type.json": (json.dumps({"title": "kurta", "variants": "eight"}).encode(), "variants"),
    "out-of-range.yaml": (b"title: kurta\nvariants: 100\n", "variants"),
    "empty-title.yaml": (b"title: ''\n", "title"),
    "non-utf8.yaml": ("title: kurta in café\n".encode("latin-1"), "(file)"),
    "oversized.yaml": (b"title: kurta\ndescription: '" + b"x" * MAX_BRIEF_FILE_BYTES + b"'\n", "(file)"),
    "not-yaml.yaml": (b"title: [unclosed\n", "(file)"),
    "list.yaml": (b"- title: kurta\n", "(brief)"),
    "too-wide.yaml": (b"title: kurta\nwidth: 4096\n", "width"),
    "beyond-model.yaml": (b"title: kurta\nwidth: 1024\n", "width"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_cli_rejects_bad_input_with_exit_2_and_changes_nothing(name, env, tmp_path, redis_client):
    content, field = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    proc = invoke_cli(["submit", str(path), "--json"], env)
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr and name in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    database = tmp_path / "home" / "genshop.db"
    if database.exists():
        assert sqlite3.connect(database).execute("select count(*) from briefs").fetchone()[0] == 0
    assert redis_client.llen(env["GENSHOP_QUEUE"]) == 0


def test_unknown_brief_id_is_invalid_input(env):
    proc = run_cli(["status", "no-such-brief"], env)
    assert proc.returncode == 2 and "no-such-brief" in proc.stderr


def test_one_pass_names_schema_and_model_limit_errors_and_broken_yaml_its_line(env, tmp_path):
    """Schema errors and the preset's limits in one message, from a CLI that loads no model
    (torch is never imported to reject a brief), and broken YAML points at its line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text('title: kurta\nwidth: 50\nsteps: 140\nvariants: "8"\n')
    broken = tmp_path / "broken.yaml"
    broken.write_text("title: kurta\nwidth: [50\nsteps: 1\n")
    script = ("import sys; from genshop.cli import main\n"
              "try:\n    main([sys.argv[1], sys.argv[2]])\n"
              "except SystemExit as e:\n    print('rc', e.code, 'torch' in sys.modules)\n")
    for path, expected in ((bad, ["variants: Input should be a valid integer", "width: 50 is not a multiple of 8",
                                  "steps: 140 exceeds 100"]),
                           (broken, ["not valid YAML", "(line 3, column 6)"])):
        proc = subprocess.run([sys.executable, "-c", script, "submit", str(path)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.stdout.strip() == "rc 2 False", proc.stdout + proc.stderr
        for text in expected:
            assert text in proc.stderr, proc.stderr
