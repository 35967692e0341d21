"""The run-file policy of a sequential run (run.json and --resume) and the hyperparameter choice."""
from __future__ import annotations

import pytest

from sphere_fast.editing.hparams import load_hparams
from sphere_fast.harness.report import read_csv, read_json, write_csv, write_json
from sphere_fast.harness.running import RUN_KEYS, choose_hparams, hparams_source, record_run

SETTINGS = {key: 1 for key in RUN_KEYS} | {"eval_every": 1}


def test_record_run_writes_and_a_resume_must_match(tmp_path):
    out = tmp_path / "run"
    record_run(out, SETTINGS, resume=False)
    assert read_json(out / "run.json") == SETTINGS
    # Settings outside RUN_KEYS may change on a resume; those in it may not.
    record_run(out, SETTINGS | {"eval_every": 2}, resume=True)
    assert read_json(out / "run.json")["eval_every"] == 2
    with pytest.raises(ValueError, match=r"holds a different run \(batch_size: was 1, now 2; seed: was 1, now 3\)"):
        record_run(out, SETTINGS | {"batch_size": 2, "seed": 3}, resume=True)
    assert read_json(out / "run.json")["batch_size"] == 1
    with pytest.raises(ValueError, match=r"stats_corpus: was 1, now 'other.txt'; dtype: was 1, now 'bfloat16'"):
        record_run(out, SETTINGS | {"stats_corpus": "other.txt", "dtype": "bfloat16"}, resume=True)
    # A run.json from before a key was recorded resumes; the key is recorded from then on.
    write_json(out / "run.json", {k: v for k, v in SETTINGS.items() if k != "dtype"})
    record_run(out, SETTINGS | {"dtype": "float32"}, resume=True)
    assert read_json(out / "run.json")["dtype"] == "float32"


def test_a_record_read_back_and_written_again_is_unchanged(tmp_path):
    # A resumed study rewrites its earlier rows from what it read: 0 must stay 0, not become 0.0.
    rows = [{"batch": 0, "edits": 0, "efficacy": 0.5},
            {"batch": 1, "edits": 100, "rank:l3": 138, "restrained:l3": 0, "efficacy": 1.0, "note": "x"}]
    path = tmp_path / "edits.csv"
    write_csv(path, rows)
    first = path.read_bytes()
    back = read_csv(path)
    assert back == rows
    assert {k: type(v) for k, v in back[1].items()} == {k: type(v) for k, v in rows[1].items()}
    write_csv(path, back)
    assert path.read_bytes() == first


def test_resume_with_nothing_to_resume_starts_a_new_run_and_says_so(tmp_path):
    said = []
    record_run(tmp_path / "new", SETTINGS, resume=True, log=said.append)
    assert said == [f"nothing to resume in {tmp_path / 'new'}, starting a new run"]
    assert read_json(tmp_path / "new" / "run.json") == SETTINGS


def test_hparams_come_from_the_given_source_then_the_named_model():
    assert hparams_source("memit", sphere=True, given="AlphaEdit/llama3-8b", model_name="smollm2") == \
        "AlphaEdit/llama3-8b"
    assert hparams_source("alphaedit", sphere=True, model_name="smollm2") == "SPHERE/smollm2-135m"
    assert hparams_source("alphaedit", sphere=True, model_name=None) is None
    assert choose_hparams(None, "memit", source="MEMIT/smollm2-135m") == load_hparams("MEMIT/smollm2-135m")
