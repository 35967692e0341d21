"""bench/compare_runs.py: two records of one run are compared at the evaluations both have."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compare_runs  # noqa: E402

HEADER = "batch,edits,eval_requests,efficacy,locality,perplexity,nq\n"


def _run(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "edits.csv").write_text(HEADER + "\n".join(rows) + "\n")
    return folder


def test_common_evaluations_and_largest_differences(tmp_path):
    a = _run(tmp_path / "a", ["0,0,10,0.1,1.0,20.0,", "1,5,,,,,", "2,10,10,0.6,0.8,21.0,", "3,20,10,0.5,0.7,22.0,0.2"])
    b = _run(tmp_path / "b", ["0,0,10,0.1,1.0,20.0,0.3", "1,5,,,,,", "2,10,10,0.55,0.85,21.5,0.25",
                              "3,15,10,0.5,0.7,22.0,0.2"])
    result = compare_runs.compare(compare_runs.evaluations(a), compare_runs.evaluations(b))
    assert [row["edits"] for row in result["rows"]] == [0, 10]  # 5 is not evaluated, 15 and 20 not common
    assert "nq" not in result["rows"][0] and "nq" not in result["rows"][1]  # A has no NQ there
    largest = result["largest"]
    assert largest["efficacy"] == {"difference": pytest.approx(0.05), "edits": 10}
    assert largest["locality"]["difference"] == pytest.approx(0.05)
    assert largest["perplexity"] == {"difference": pytest.approx(0.5), "edits": 10}
    assert "nq" not in largest


def test_a_folder_without_records_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no edits.csv"):
        compare_runs.evaluations(tmp_path)
