"""The four general-ability tasks: loading each file format, and scoring with a model whose answers are fixed."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from sphere_fast.harness.general_tasks import TASKS, _contains_words, _normalise, _same_number, evaluate_task, load_task


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six or four records per task; the first number in each prompt is the record's index i."""
    folder = tmp_path_factory.mktemp("general")
    (folder / "test-ClosedDomainQA.jsonl").write_text("\n".join(json.dumps(
        {"question": f"is {i} even", "title": "t", "answer": i % 2 == 0, "passage": f"{i} is a number."})
        for i in range(6)))
    (folder / "test-NLI.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\tCat {i} sat.\tAn animal sat.\t{'entailment' if i % 3 else 'not_entailment'}\n" for i in range(6)))
    (folder / "test-OpenDomainQA.jsonl").write_text("\n".join(json.dumps(
        {"question": f"who wrote book {i}?", "answer": ["The Author", "X"], "output": [f"\n\nBook {i}: The Author."]})
        for i in range(4)))
    (folder / "test-reasoning.jsonl").write_text("\n".join(json.dumps(
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"})
        for i in range(4)))
    return folder


def test_each_file_format_loads(data_dir):
    boolq = load_task("boolq", 4, data_dir=data_dir)
    assert len(boolq) == 4 and {it["gold"] for it in boolq} <= {"yes", "no"}
    assert "Question: is" in boolq[0]["prompt"] and boolq[0]["prompt"].endswith("Answer (yes or no):")
    rte = load_task("rte", 6, data_dir=data_dir)
    assert sorted(it["gold"] for it in rte) == ["no", "no", "yes", "yes", "yes", "yes"]
    nq = load_task("nq", 2, data_dir=data_dir)
    assert nq[0]["gold"] == ["The Author", "X"] and re.search(r"Book \d: The Author\.\nQuestion: who", nq[0]["prompt"])
    assert sorted(it["gold"] for it in load_task("gsm8k", 4, data_dir=data_dir)) == ["0", "2", "4", "6"]
    assert load_task("boolq", 4, data_dir=data_dir, seed=0) == boolq  # a fixed sample
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("mmlu", 1, data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="boolq"):
        load_task("boolq", 1, data_dir=data_dir / "missing")


class WordTokenizer:
    """Whitespace words, each given an id when first seen; <pad> = 0, and <bos> = 1 put first like Llama's."""

    def __init__(self):
        self.words = ["<pad>", "<bos>"]
        self.pad_token_id, self.eos_token_id = 0, None

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for w in text.split():
            if w not in self.words:
                self.words.append(w)
            ids.append(self.words.index(w))
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids if not (skip_special_tokens and i < 2))


class AnswerLM(torch.nn.Module):
    """Replies to each known prompt with a fixed text: after <bos> + prompt + the reply so far, the reply's next
    word is the only likely token, then <pad>. Any other sequence (a prompt built or padded wrongly) raises."""

    VOCAB = 256

    def __init__(self, tok: WordTokenizer, replies: dict[str, str]):
        super().__init__()
        self.emb = torch.nn.Embedding(1, 1)  # where the inputs go
        self.replies = {tuple(tok(p)["input_ids"]): tok(" " + r, add_special_tokens=False)["input_ids"]
                        for p, r in replies.items()}
        tok(" yes no", add_special_tokens=False)
        assert len(tok.words) <= self.VOCAB

    def get_input_embeddings(self):
        return self.emb

    def _next(self, seq: list[int]) -> int:
        for prompt, reply in self.replies.items():
            said = seq[len(prompt):]
            padded = reply + [0] * (len(said) + 1)
            if tuple(seq[:len(prompt)]) == prompt and said == padded[:len(said)]:
                return padded[len(said)]
        raise KeyError(f"no reply for the sequence {seq}")

    def forward(self, input_ids):
        (seq,) = input_ids.tolist()
        logits = torch.zeros(1, len(seq), self.VOCAB)
        logits[0, -1, self._next(seq)] = 10.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, do_sample):
        assert not do_sample and pad_token_id == 0
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            start = mask.index(1)
            assert all(mask[start:]) and all(t == 0 for t in ids[:start])  # left padding
            seq = ids[start:]
            while len(seq) < len(ids) - start + max_new_tokens:
                seq.append(self._next(seq))
            rows.append(ids[:start] + seq)
        return torch.tensor(rows)


def _index(item: dict) -> int:
    return int(re.search(r"\d+", item["prompt"]).group())


# The model's reply to record i of each task, and which replies score as correct.
REPLIES = {
    "boolq": ["yes", "no", "no", "no", "yes", "no"],  # gold: yes for even i
    "rte": ["no", "no", "yes", "yes", "yes", "yes"],  # gold: no for i = 0, 3
    # gold: The Author, X; whole words only ("next" holds the letter x, "authors" the word author)
    "nq": ["It was the author!", "Someone else wrote it", "x", "next, the authors"],
    "gsm8k": ["0 + 0 = 0", "it is 2.0", "4 or 5", "I do not know"],  # gold: 2 i, the last number counts
}
CORRECT = {"boolq": [1, 1, 0, 1, 1, 1], "rte": [1, 0, 1, 0, 1, 1], "nq": [1, 0, 1, 0], "gsm8k": [1, 1, 0, 0]}


@pytest.mark.parametrize("task", TASKS)
def test_scoring_with_known_answers(data_dir, task):
    tok = WordTokenizer()
    items = load_task(task, len(REPLIES[task]), data_dir=data_dir)
    assert sorted(map(_index, items)) == list(range(len(REPLIES[task])))
    model = AnswerLM(tok, {it["prompt"]: REPLIES[task][_index(it)] for it in items})
    model.train()
    result = evaluate_task(model, tok, task, items, batch_size=3)  # batches of unequal prompt lengths
    assert model.training  # the mode is restored
    n = len(items)
    assert result["n"] == n and result["accuracy"] == sum(CORRECT[task]) / n
    if task in ("boolq", "rte"):
        gold_yes = sum(it["gold"] == "yes" for it in items)
        assert result["answered_yes"] == REPLIES[task].count("yes") / n and result["chance"] == 0.5
        assert result["majority"] == max(gold_yes, n - gold_yes) / n
    else:
        assert result["chance"] == 0.0
        by_prompt = {it["prompt"][-120:]: REPLIES[task][_index(it)] for it in items}
        assert [by_prompt[e["prompt_end"]] for e in result["examples"]] == [e["reply"] for e in result["examples"]]


def test_answer_matching():
    assert _normalise("The  Author!") == "author"
    assert _same_number("18", "18.0") and not _same_number("18", "19") and not _same_number("x", "1")
    assert _contains_words("It was in 1960.", "1960") and not _contains_words("It was in 1960.", "6")
    assert _contains_words("born in New York City", "new york") and not _contains_words("a York", "new york")
    assert not _contains_words("anything", "The")  # a gold that normalises to nothing never matches
