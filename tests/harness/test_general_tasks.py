"""The four general-ability tasks: loading each file format, and scoring on a tiny model."""
from __future__ import annotations

import json

import pytest

from sphere_fast.harness.general_tasks import TASKS, _normalise, _same_number, evaluate_task, load_task

from tests.editing.fixtures import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("general")
    (folder / "test-ClosedDomainQA.jsonl").write_text("\n".join(json.dumps(
        {"question": f"is {i} even", "title": "t", "answer": i % 2 == 0, "passage": f"{i} is a number."})
        for i in range(6)))
    (folder / "test-NLI.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\tA cat sat.\tAn animal sat.\t{'entailment' if i % 3 else 'not_entailment'}\n" for i in range(6)))
    (folder / "test-OpenDomainQA.jsonl").write_text("\n".join(json.dumps(
        {"question": "who wrote it?", "answer": ["The Author", "X"], "output": ["\n\nIt was The Author."]})
        for _ in range(3)))
    (folder / "test-reasoning.jsonl").write_text("\n".join(json.dumps(
        {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}) for _ in range(3)))
    return folder


def test_each_file_format_loads(data_dir):
    boolq = load_task("boolq", 4, data_dir=data_dir)
    assert len(boolq) == 4 and {it["gold"] for it in boolq} <= {"yes", "no"}
    assert "Question: is" in boolq[0]["prompt"] and boolq[0]["prompt"].endswith("Answer (yes or no):")
    rte = load_task("rte", 6, data_dir=data_dir)
    assert sorted(it["gold"] for it in rte) == ["no", "no", "yes", "yes", "yes", "yes"]
    nq = load_task("nq", 2, data_dir=data_dir)
    assert nq[0]["gold"] == ["The Author", "X"] and "It was The Author." in nq[0]["prompt"]
    assert load_task("gsm8k", 1, data_dir=data_dir)[0]["gold"] == "4"
    assert load_task("boolq", 4, data_dir=data_dir, seed=0) == boolq  # a fixed sample
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("mmlu", 1, data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="boolq"):
        load_task("boolq", 1, data_dir=data_dir / "missing")


def test_scoring_on_a_tiny_model(data_dir):
    tok = tiny_tokenizer(bos=True)
    model = tiny_model("llama", tok)
    for task in TASKS:
        result = evaluate_task(model, tok, task, load_task(task, 3, data_dir=data_dir))
        assert result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    boolq = evaluate_task(model, tok, "boolq", load_task("boolq", 6, data_dir=data_dir))
    assert boolq["majority"] == 0.5 and boolq["answered_yes"] in (0.0, 1 / 6, 2 / 6, 0.5, 4 / 6, 5 / 6, 1.0)


def test_answer_matching():
    assert _normalise("The  Author!") == "author"
    assert _same_number("18", "18.0") and not _same_number("18", "19") and not _same_number("x", "1")
