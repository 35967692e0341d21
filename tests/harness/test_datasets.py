"""Dataset loaders on the shared data files (all three schemas) and on broken files."""
from __future__ import annotations

import json

import pytest

from sphere_fast.editing import paths
from sphere_fast.harness.datasets import (
    DatasetError,
    detect_schema,
    load_requests,
    parse_records,
    subject_template,
    synthetic_requests,
)


def data_file(*parts: str):
    path = paths.data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"data file {path} not present (set SPHERE_FAST_DATA_DIR)")
    return path


CF_MEMIT = ("counterfact", "counterfact_memit_format_first5.json")
CF_EASY = ("counterfact", "easyedit_counterfact-edit.json")
ZSRE_1K = ("zsre", "zsre_mend_train-1k.json")
ZSRE_5 = ("zsre", "zsre_mem_eval_first5.json")


def test_counterfact_memit_schema():
    path = data_file(*CF_MEMIT)
    raw = json.loads(path.read_text())
    reqs = load_requests(path)
    assert len(reqs) == len(raw) == 5
    r = reqs[0]
    assert r.prompt == "The mother tongue of {} is"
    assert r.subject == "Danielle Darrieux"
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.target_true) == ("English", "French")
    assert r.case_id == 0
    assert r.rephrase_prompts == tuple(raw[0]["paraphrase_prompts"])
    assert r.neighborhood_prompts == tuple(raw[0]["neighborhood_prompts"])
    # Neighbours share the true attribute.
    assert r.neighborhood_targets == ("French",) * len(raw[0]["neighborhood_prompts"])
    for req, rec in zip(reqs, raw):
        assert req.text == rec["requested_rewrite"]["prompt"].format(rec["requested_rewrite"]["subject"])
        assert req.target_new == rec["requested_rewrite"]["target_new"]["str"]


def test_easyedit_flat_schema_builds_templates():
    path = data_file(*CF_EASY)
    raw = json.loads(path.read_text())
    reqs = load_requests(path, limit=300)
    assert len(reqs) == 300
    for req, rec in zip(reqs, raw):
        assert req.prompt.count("{}") == 1
        assert req.text == rec["prompt"]  # the template reproduces the spelled-out prompt
        assert req.target_new == rec["target_new"] and req.target_true == rec["ground_truth"]
        assert req.rephrase_prompts == (rec["rephrase_prompt"],)
        assert req.neighborhood_prompts == (rec["locality_prompt"],)
        assert req.neighborhood_targets == (rec["locality_ground_truth"],)
        assert req.case_id == rec["case_id"]
    assert reqs[0].prompt == "The mother tongue of {} is"


def test_zsre_mend_schema():
    path = data_file(*ZSRE_5)
    reqs = load_requests(path)
    assert len(reqs) == 5
    r = reqs[0]
    assert r.prompt == "What university did {} attend?"
    assert r.subject == "Watts Humphrey"
    assert r.target_new == "University of Michigan"
    assert r.target_true == "Illinois Institute of Technology"  # answers[0], not the model's pred
    assert r.rephrase_prompts == ("What university did Watts Humphrey take part in?",)
    # MEMIT's ZsRE evaluation: the NQ prompt keeps its prefix and gets a question mark.
    assert r.neighborhood_prompts == ("nq question: who played desmond doss father in hacksaw ridge?",)
    assert r.neighborhood_targets == ("Hugo Weaving",)


def test_zsre_1k_invalid_records_raise_or_skip():
    path = data_file(*ZSRE_1K)
    with pytest.raises(DatasetError, match=r"record 534 \(zsre schema\).*target_new is empty"):
        load_requests(path)
    with pytest.warns(UserWarning, match="skipped 2 record"):
        reqs = load_requests(path, invalid="skip")
    assert len(reqs) == 998
    assert all(r.target_new.strip() for r in reqs)
    assert load_requests(path, limit=10)[9].case_id == 9


def test_schema_detection_and_explicit_schema():
    assert detect_schema({"requested_rewrite": {}}) == "counterfact"
    assert detect_schema({"src": "q", "alt": "a"}) == "zsre"
    assert detect_schema({"prompt": "p", "target_new": "t"}) == "easyedit"
    with pytest.raises(DatasetError, match="cannot tell the schema"):
        detect_schema({"question": "?"})
    # An explicit schema that does not fit names the missing field.
    path = data_file(*ZSRE_5)
    with pytest.raises(DatasetError, match=r"record 0 \(counterfact schema\): missing field 'requested_rewrite'"):
        load_requests(path, schema="counterfact")
    with pytest.raises(ValueError, match="schema must be one of"):
        load_requests(path, schema="mend")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_requests(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": ')
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON"):
        load_requests(broken)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_requests(scalar)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DatasetError, match="no records"):
        load_requests(empty)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_requests(empty, limit=0)


def test_missing_field_names_file_record_and_field(tmp_path):
    raw = json.loads(data_file(*CF_MEMIT).read_text())
    del raw[3]["requested_rewrite"]["target_new"]
    bad = tmp_path / "cf.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(DatasetError) as info:
        load_requests(bad)
    msg = str(info.value)
    assert str(bad) in msg and "record 3" in msg and "'requested_rewrite.target_new'" in msg

    flat = [{"prompt": "Paris is the capital of", "subject": "Rome", "target_new": "Italy"}]
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(flat))
    with pytest.raises(DatasetError, match=r"record 0 \(easyedit schema\): subject 'Rome' does not occur in field 'prompt'"):
        load_requests(path)
    flat[0]["subject"] = 7
    path.write_text(json.dumps(flat))
    with pytest.raises(DatasetError, match="field 'subject' must be a string, got int"):
        load_requests(path)


def test_jsonl_lists_and_case_insensitive_subject(tmp_path):
    recs = [
        {"prompt": "the capital of france is", "subject": "France", "target_new": "Rome",
         "rephrase_prompt": ["France's capital is", "The French capital is"],
         "locality_prompt": ["The capital of Spain is", "The capital of Italy is"],
         "locality_ground_truth": [["Madrid"], ["Rome"]]},
    ]
    path = tmp_path / "recs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (r,) = load_requests(path)
    assert r.prompt == "the capital of {} is" and r.text == "the capital of France is"
    assert r.rephrase_prompts == ("France's capital is", "The French capital is")
    assert r.neighborhood_targets == ("Madrid", "Rome")
    assert r.case_id == 0
    assert subject_template("a B c", "b") == "a {} c"
    assert subject_template("abc", "x") is None


def test_parse_records_rejects_stray_braces():
    rec = {"prompt": "The {weird} capital of France is", "subject": "France", "target_new": "Rome"}
    with pytest.raises(DatasetError, match="braces other than the subject placeholder"):
        parse_records([rec], source="mem")


class _WordTokenizer:
    """Whitespace tokenizer: enough for synthetic_requests' single-token check."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


def test_synthetic_requests_are_valid_and_seeded():
    tok = _WordTokenizer()
    a = synthetic_requests(tok, 12, seed=3)
    assert len(a) == 12 and a == synthetic_requests(tok, 12, seed=3)
    assert a != synthetic_requests(tok, 12, seed=4)
    subjects = {r.subject for r in a}
    assert len(subjects) == 12
    for r in a:
        r.validate()
        assert r.target_new != r.target_true
        assert all(r.subject in p for p in r.rephrase_prompts)
        assert len(r.neighborhood_prompts) == len(r.neighborhood_targets) == 2
        assert all(r.subject not in p for p in r.neighborhood_prompts)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        synthetic_requests(tok, 0)
