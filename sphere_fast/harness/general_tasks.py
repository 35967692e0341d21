"""The paper's four general-ability tasks (after RECT): BoolQ, RTE, NQ-open with its passage, GSM8K.

Files (``<data>/general/``, see PROVENANCE.md there): ``test-ClosedDomainQA.jsonl`` (BoolQ:
question, passage, answer true/false), ``test-NLI.tsv`` (RTE: sentence1, sentence2, label),
``test-OpenDomainQA.jsonl`` (NQ-open: question, answer list, output = a passage),
``test-reasoning.jsonl`` (GSM8K: question, answer ending in ``#### number``).

Scoring, zero-shot, the same for every model:

* BoolQ and RTE: the model's log-likelihood of " yes" against " no" after a fixed prompt (accuracy;
  chance 0.5, and the majority answer's share is reported beside it);
* NQ-open: greedy answer after the passage and question; correct when a gold answer is a run of whole
  words in it, after lower-casing and dropping punctuation and articles (the SPHERE code's "soft exact
  match": gold "6" does not match "1960");
* GSM8K: greedy answer; correct when its last number equals the gold ``#### number``.

This is not RECT's own scoring (which generates free text from instruction-tuned 7B models): on a
135M model, comparing the two answers' likelihoods is what can rise above chance at all.
"""
from __future__ import annotations

import csv
import json
import random
import re
import string
from pathlib import Path
from typing import Sequence

import torch

from ..editing import paths
from .metrics import generate, special_prefix

TASKS = ("boolq", "rte", "nq", "gsm8k")
FILES = {"boolq": "test-ClosedDomainQA.jsonl", "rte": "test-NLI.tsv", "nq": "test-OpenDomainQA.jsonl",
         "gsm8k": "test-reasoning.jsonl"}


def task_path(task: str, data_dir: Path | None = None) -> Path:
    if task not in FILES:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return (data_dir or paths.data_dir() / "general") / FILES[task]


def load_task(task: str, n: int, *, seed: int = 0, data_dir: Path | None = None) -> list[dict]:
    """``n`` items of ``task`` (a fixed seeded sample), as {"prompt", "gold", ...} dicts."""
    path = task_path(task, data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{task}: {str(path)!r} not found (set SPHERE_FAST_DATA_DIR)")
    if task == "rte":
        with open(path, newline="", encoding="utf-8") as fh:
            records = list(csv.DictReader(fh, delimiter="\t"))
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pick = list(range(len(records)))
    random.Random(seed).shuffle(pick)
    items = []
    for i in pick[:n]:
        r = records[i]
        if task == "boolq":
            items.append({"prompt": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer (yes or no):",
                          "gold": "yes" if r["answer"] else "no"})
        elif task == "rte":
            items.append({"prompt": f"{r['sentence1']}\nQuestion: Does this imply that \"{r['sentence2']}\"?\n"
                                    f"Answer (yes or no):",
                          "gold": "yes" if r["label"] == "entailment" else "no"})
        elif task == "nq":
            passage = " ".join(str(o).strip() for o in r.get("output", []))
            items.append({"prompt": f"{passage}\nQuestion: {r['question']}\nAnswer:", "gold": list(r["answer"])})
        else:
            items.append({"prompt": f"Question: {r['question']}\nAnswer:",
                          "gold": r["answer"].split("####")[-1].strip().replace(",", "")})
    return items


@torch.no_grad()
def _choice_scores(model, tokenizer, prompts: Sequence[str], options: Sequence[str], max_tokens: int = 768):
    """Log-likelihood of each option (one token each, leading space) after each prompt: [prompt][option]."""
    prefix = special_prefix(tokenizer)
    option_ids = [tokenizer(" " + o, add_special_tokens=False)["input_ids"][0] for o in options]
    device = next(model.parameters()).device
    scores = []
    for p in prompts:
        ids = prefix + tokenizer(p, add_special_tokens=False)["input_ids"]
        ids = ids[-max_tokens:]  # long passages: keep the question end
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        scores.append([float(logp[i]) for i in option_ids])
    return scores


def _normalise(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _contains_words(reply: str, gold: str) -> bool:
    """Whether the normalised ``gold`` is a run of whole words of the normalised ``reply``."""
    gold = _normalise(gold)
    return bool(gold) and f" {gold} " in f" {_normalise(reply)} "


def _same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except ValueError:
        return False


def evaluate_task(model, tokenizer, task: str, items: list[dict], *, batch_size: int = 8) -> dict:
    """Accuracy of the model on ``items`` of ``task`` (see the module docstring)."""
    was_training = model.training
    model.eval()
    try:
        if task in ("boolq", "rte"):
            scores = _choice_scores(model, tokenizer, [it["prompt"] for it in items], ["yes", "no"])
            answers = ["yes" if s[0] >= s[1] else "no" for s in scores]
            correct = [a == it["gold"] for a, it in zip(answers, items)]
            majority = max(sum(it["gold"] == "yes" for it in items), sum(it["gold"] == "no" for it in items))
            return {"task": task, "n": len(items), "accuracy": sum(correct) / len(items), "chance": 0.5,
                    "majority": majority / len(items), "answered_yes": answers.count("yes") / len(items)}
        tokens = 24 if task == "nq" else 160
        replies = generate(model, tokenizer, [it["prompt"] for it in items], max_new_tokens=tokens,
                           batch_size=batch_size, continuation=True)
        if task == "nq":
            correct = [any(_contains_words(r, g) for g in it["gold"]) for r, it in zip(replies, items)]
        else:
            correct = []
            for r, it in zip(replies, items):
                numbers = re.findall(r"-?\d+(?:\.\d+)?", r.replace(",", ""))
                correct.append(bool(numbers) and _same_number(numbers[-1], it["gold"]))
        return {"task": task, "n": len(items), "accuracy": sum(correct) / len(items), "chance": 0.0,
                "examples": [{"prompt_end": it["prompt"][-120:], "reply": r[:160]} for r, it in
                             zip(replies[:3], items[:3])]}
    finally:
        model.train(was_training)


def pilot(model, tokenizer, *, n: dict[str, int] | None = None, seed: int = 0, data_dir: Path | None = None,
          log=print) -> dict:
    """Each task on the unedited model: which ones rise clearly above chance (or their floor)."""
    import time

    n = n or {"boolq": 200, "rte": 200, "nq": 100, "gsm8k": 30}
    out = {}
    for task, count in n.items():
        t0 = time.perf_counter()
        result = evaluate_task(model, tokenizer, task, load_task(task, count, seed=seed, data_dir=data_dir))
        result["seconds"] = time.perf_counter() - t0
        out[task] = result
        log(f"[pilot] {task}: accuracy {result['accuracy']:.3f} on {count} items "
            f"(chance {result['chance']}{', majority %.3f' % result['majority'] if 'majority' in result else ''}; "
            f"{result['seconds']:.0f} s)")
    return out
