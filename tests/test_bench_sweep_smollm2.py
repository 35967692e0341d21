"""bench/sweep_smollm2.py: the edit-split report and the train-split sweep write their own tables."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sweep_smollm2  # noqa: E402

SECONDS = {"stats": 1.0, "targets": 8.0, "keys": 0.5, "solve": 0.25, "sphere": 0.125, "apply": 0.0, "total": 9.875}


def _meta(split: str) -> dict:
    return {"date": "2026-01-02", "commit": "abc1234", "device": "cpu", "split": split, "data": "cf.json", "n": 40,
            "batch_size": 20, "stats_lines": 300, "stats_corpus": "wiki.txt", "base": "SPHERE/smollm2-135m"}


def _rows(label: str) -> list[dict]:
    after = {"efficacy": 0.5, "generalization": 0.25, "specificity": 0.125, "locality": 0.75}
    batches = [{"batch": 0, "size": 20, "seconds": SECONDS}, {"batch": 1, "size": 20, "seconds": SECONDS}]
    return [{"label": "unedited", "after": {**after, "locality": 1.0}},
            {"label": label, "after": after, "batches": batches, "edit_seconds": 19.8}]


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_smollm2, "RESULTS", tmp_path)
    return tmp_path


def test_edit_report_names_runs_and_splits_each_batch(results):
    stem = sweep_smollm2._write("edit40", _meta("edit"), _rows("memit+sphere"))
    md = stem.with_suffix(".md").read_text()
    assert md.startswith("# SmolLM2-135M-Instruct, 40 edit-split requests in sequential batches")
    assert "settings: memit+sphere `MEMIT/smollm2-135m`" in md
    assert "| run | efficacy |" in md
    assert "| memit+sphere | 0.500 | 0.250 | 0.125 | 0.750 | 20 | 16 | 1.0 | 0.50 | 0.25 |" in md
    assert "## Per-batch time split (s)" in md
    assert "| memit+sphere | 1 | 1.00 | 8.00 | 0.50 | 0.25 | 0.12 | 0.00 | 9.88 |" in md
    assert json.loads(stem.with_suffix(".json").read_text())["rows"][1]["label"] == "memit+sphere"


def test_sweep_names_overrides_and_has_no_batch_split(results):
    stem = sweep_smollm2._write("sweep", _meta("train"), _rows('{"L2": 1.0}'))
    md = stem.with_suffix(".md").read_text()
    assert md.startswith("# SmolLM2-135M-Instruct, sweep (train split)")
    assert '| overrides | efficacy |' in md and '| {"L2": 1.0} | 0.500 |' in md
    assert "base settings `SPHERE/smollm2-135m`" in md and "Per-batch" not in md
