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
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(b"not really a png, only needs to exist")
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
