"""Impressions format: validated import (every bad row named, nothing half-imported), versioned Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from reward.impressions import (FORMAT_VERSION, VERSION_KEY, ImpressionFormatError, ImpressionValidationError,
                                import_impressions, read_impressions)

ITEMS = {"p1", "p2", "p3", "p4"}
GROUPS = {"A", "B"}


def row(impression_id: str, items=("p1", "p2", "p3"), chosen="p1", group="A", **fields) -> dict:
    return {"impression_id": impression_id, "group_id": group, "brief": "red kurta for women", "items": list(items),
            "chosen": chosen, "timestamp": "2025-03-01T10:00:00Z", "source": "ab_import", **fields}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_valid_jsonl_imports_as_versioned_parquet_with_pairwise_and_no_choice(tmp_path):
    source = write_jsonl(tmp_path / "log.jsonl", [
        row("i1", clicks=[1, 0, 0], purchases=[1, 0, 0]),
        row("i2", items=("p3", "p4"), chosen="p4"),  # a pairwise preference: K = 2
        row("i3", chosen=None, timestamp=1740823200),  # chose none; Unix seconds
    ])
    report = import_impressions(source, tmp_path / "imp.parquet", ITEMS, GROUPS)
    assert (report.imported, report.total) == (3, 3)
    metadata = pq.read_schema(tmp_path / "imp.parquet").metadata
    assert metadata[VERSION_KEY] == str(FORMAT_VERSION).encode()
    frame = read_impressions(tmp_path / "imp.parquet")
    assert frame["impression_id"].tolist() == ["i1", "i2", "i3"]
    assert frame["items"].tolist() == [["p1", "p2", "p3"], ["p3", "p4"], ["p1", "p2", "p3"]]
    assert frame["chosen"].tolist()[:2] == ["p1", "p4"] and frame["chosen"].isna().tolist()[2]
    assert list(frame["clicks"][0]) == [1, 0, 0]
    assert str(frame["timestamp"].dt.tz) == "UTC"


def test_invalid_rows_are_each_named_and_nothing_is_imported(tmp_path):
    out = tmp_path / "imp.parquet"
    import_impressions(write_jsonl(tmp_path / "first.jsonl", [row("old-1")]), out, ITEMS, GROUPS)
    before = out.read_bytes()
    source = write_jsonl(tmp_path / "bad.jsonl", [
        row("ok-1"),
        row("unknown-item", items=("p1", "nope")),
        row("too-few", items=("p1",), chosen="p1"),
        row("wrong-choice", chosen="p4"),
        row("ok-1"),  # duplicate of row 1
        row("old-1"),  # duplicate of a row already in the file
        row("who", group="Z"),
        row("short-clicks", clicks=[1, 0]),
    ])
    with pytest.raises(ImpressionValidationError) as caught:
        import_impressions(source, out, ITEMS, GROUPS, append=True)
    issues = caught.value.issues
    text = "\n".join(issues)
    assert "row 2 (impression 'unknown-item')" in text and "'nope'" in text
    assert "row 3 (impression 'too-few')" in text and "K >= 2" in text
    assert "row 4 (impression 'wrong-choice')" in text and "not among the 3 items shown" in text
    assert "row 5 (impression 'ok-1'): duplicate impression id, first seen in row 1" in text
    assert "row 6 (impression 'old-1'): duplicate impression id, first seen in the existing file" in text
    assert "row 7 (impression 'who')" in text and "unknown group 'Z'" in text
    assert "row 8 (impression 'short-clicks')" in text and "clicks" in text
    assert not any(issue.startswith("row 1 ") for issue in issues)
    assert out.read_bytes() == before  # nothing half-imported
    assert not (tmp_path / "never.parquet").exists()
    with pytest.raises(ImpressionValidationError):
        import_impressions(source, tmp_path / "never.parquet", ITEMS, GROUPS)
    assert not (tmp_path / "never.parquet").exists()
    assert list(tmp_path.glob(".*tmp*")) == []


def test_foreign_parquet_and_image_paths_import_and_unversioned_files_are_refused(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red" if name == "a.png" else "blue").save(tmp_path / "imgs" / name)
    foreign = tmp_path / "ab-export.parquet"
    pd.DataFrame([row("x1", items=("imgs/a.png", "imgs/b.png"), chosen="imgs/b.png")]).to_parquet(foreign)
    with pytest.raises(ImpressionFormatError, match="genshop reward import"):
        read_impressions(foreign)
    import_impressions(foreign, tmp_path / "imp.parquet", known_items=set(), known_groups=GROUPS)
    frame = read_impressions(tmp_path / "imp.parquet")
    assert frame["items"][0] == [str((tmp_path / "imgs" / n).resolve()) for n in ("a.png", "b.png")]
    assert frame["chosen"][0] == str((tmp_path / "imgs" / "b.png").resolve())


def test_cli_import_exits_2_naming_rows(tmp_path):
    from genshop.cli_reward import reward
    from reward.synthetic import write_synthetic_catalog

    catalog = write_synthetic_catalog(tmp_path / "catalog.parquet", 5)
    source = write_jsonl(tmp_path / "bad.jsonl", [row("a", items=("0", "1")), row("b", items=("0", "99"), chosen="0")])
    result = CliRunner().invoke(reward, ["import", str(source), "--out", str(tmp_path / "imp.parquet"),
                                         "--catalog", str(catalog)])
    assert result.exit_code == 2, result.output
    assert "row 2 (impression 'b')" in result.output and "'99'" in result.output
    assert not (tmp_path / "imp.parquet").exists()
    source = write_jsonl(tmp_path / "good.jsonl", [row("a", items=("0", "1"), chosen="1")])
    result = CliRunner().invoke(reward, ["import", str(source), "--out", str(tmp_path / "imp.parquet"),
                                         "--catalog", str(catalog)])
    assert result.exit_code == 0, result.output
    assert len(read_impressions(tmp_path / "imp.parquet")) == 1


def _invoke_import(tmp_path: Path, source: Path, *extra: str):
    from genshop.cli_reward import reward

    result = CliRunner().invoke(reward, ["import", str(source), "--out", str(tmp_path / "imp.parquet"), *extra])
    assert not (tmp_path / "imp.parquet").exists()
    return result


def test_hostile_numbers_bytes_nesting_and_files_exit_2_naming_the_row(tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", [])
    lines = [json.dumps(row("ok", items=("0", "1"), chosen="1"))]
    lines += [json.dumps(row(f"t{n}", items=("0", "1"), timestamp=value)).replace('"@"', literal)
              for n, (value, literal) in enumerate([(1e20, ""), ("@", "NaN"), (-1e15, ""), ("@", "Infinity")])]
    lines.append(json.dumps(row("many-clicks", items=("0", "1"), clicks=[2**70, 0])))
    lines.append(json.dumps(row("nan-prob", items=("0", "1"), sim_probabilities=[0.5, 0.5, 0.0])).replace("0.0]", "NaN]"))
    lines.append(json.dumps(row("huge-brief", items=("0", "1"), brief="b" * 5_000_000)))
    lines.append("[" * 100_000 + "]" * 100_000)
    source.write_bytes("\n".join(lines).encode() + b"\n" + b'{"impression_id": "\xff\xfe"}\n')
    from reward.synthetic import write_synthetic_catalog

    catalog = write_synthetic_catalog(tmp_path / "catalog.parquet", 3)
    result = _invoke_import(tmp_path, source, "--catalog", str(catalog))
    assert result.exit_code == 2, result.output
    output = result.output
    for number, expected in [(2, "timestamp"), (3, "timestamp"), (4, "timestamp"), (5, "timestamp"),
                             (6, "clicks.0"), (7, "sim_probabilities.2"), (8, "brief"), (9, "nested too deeply"),
                             (10, "not UTF-8")]:
        assert any(line.strip().startswith(f"row {number}") and expected in line for line in output.splitlines()), \
            (number, expected, output[-3000:])
    assert "row 1 " not in output and "9 invalid row(s)" in output and len(output) < 20_000

    truncated = tmp_path / "truncated.parquet"
    pd.DataFrame([row("x", items=("0", "1"))]).to_parquet(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    result = _invoke_import(tmp_path, truncated, "--catalog", str(catalog))
    assert result.exit_code == 2 and "not a readable Parquet file" in result.output, result.output


def test_image_items_must_be_real_images_inside_the_named_folders(tmp_path):
    from PIL import Image

    shown = tmp_path / "shown"
    shown.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red" if name == "a.png" else "blue").save(shown / name)
    (shown / "fake.png").write_bytes(b"not an image")
    (shown / "link.png").symlink_to("/etc/hostname")
    data = tmp_path / "data"
    data.mkdir()
    good = [row("ok", items=(str(shown / "a.png"), str(shown / "b.png")), chosen=None)]
    hostile = [("passwd", "/etc/passwd"), ("hostname", "/etc/hostname"), ("climb", "../" * 40 + "etc/passwd"),
               ("fake", str(shown / "fake.png")), ("link", str(shown / "link.png"))]
    source = write_jsonl(data / "log.jsonl", good + [row(name, items=(str(shown / "a.png"), item), chosen=None)
                                                     for name, item in hostile])
    result = _invoke_import(tmp_path, source, "--images-root", str(shown))
    assert result.exit_code == 2, result.output
    for number, (name, item) in enumerate(hostile, start=2):
        problem = "not images" if name == "fake" else "outside the image folders"
        assert f"row {number} (impression '{name}')" in result.output, (name, result.output)
        line = next(line for line in result.output.splitlines() if f"impression '{name}'" in line)
        assert problem in line, (name, line)
    assert "5 invalid row(s)" in result.output

    # without --images-root, only the source file's own folder is allowed
    result = _invoke_import(tmp_path, write_jsonl(data / "good.jsonl", good))
    assert result.exit_code == 2 and "outside the image folders" in result.output
    from genshop.cli_reward import reward

    ok = CliRunner().invoke(reward, ["import", str(data / "good.jsonl"), "--out", str(tmp_path / "imp.parquet"),
                                     "--images-root", str(shown)])
    assert ok.exit_code == 0, ok.output
    assert read_impressions(tmp_path / "imp.parquet")["items"][0] == [str(shown / "a.png"), str(shown / "b.png")]
