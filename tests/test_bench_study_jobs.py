"""bench/study_jobs.py: its study spec is valid and its throughput arithmetic is the one it states."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sphere_fast.harness.study_spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import study_jobs  # noqa: E402

HEADER = "batch,edits,seconds_total,seconds_stats,seconds_eval_edits,seconds_eval_general\n"


def test_spec_is_a_valid_study():
    spec = load_spec(json.loads(study_jobs.spec_text(60, 20)))
    assert spec.horizon == 60 and spec.batch_size == 20 and [r.name for r in spec.runs] == ["memit", "memit+sphere"]


def _runs(tmp_path: Path) -> Path:
    for name, rows in {"a": ["1,20,10,4,,", "2,40,10,0,3,2"], "b": ["1,20,12,0,,", "2,40,12,0,1,1"]}.items():
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "edits.csv").write_text(HEADER + "0,0,,,,\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_throughput_side_by_side_and_one_after_the_other(tmp_path):
    out = _runs(tmp_path)
    assert study_jobs.run_seconds(out / "runs" / "a" / "edits.csv") == (40, pytest.approx(21.0))  # stats left out
    side = study_jobs.throughput(out, jobs=2)
    assert side["edits"] == 80 and side["seconds"] == pytest.approx(26.0)  # the slower run
    serial = study_jobs.throughput(out, jobs=1)
    assert serial["seconds"] == pytest.approx(47.0) and serial["edits_per_s"] == pytest.approx(80 / 47)
