"""Editing metrics against hand computations and an independent per-example loop."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sphere_fast.accuracy import energy_interval
from sphere_fast.editing.requests import EditRequest
from sphere_fast.harness.metrics import (
    evaluate,
    fluency_score,
    generate,
    layer_energies,
    neighborhood_predictions,
    ngram_entropy,
    special_prefix,
    teacher_forced_predictions,
)

WORDS = ["<pad>", "<bos>", "the", "capital", "of", "France", "is", "Rome", "city", "big", "has", "nice",
         "Italy", "Paris", "hello"]

pytestmark = pytest.mark.usefixtures("one_thread")


class WordTokenizer:
    """Whitespace word tokenizer over WORDS; ``bos=True`` prepends <bos> like Llama's tokenizer."""

    def __init__(self, bos: bool):
        self.bos = bos
        self.ids = {w: i for i, w in enumerate(WORDS)}
        self.pad_token_id = 0
        self.eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        ids = [self.ids[w] for w in text.split()]
        return {"input_ids": ([1] if (self.bos and add_special_tokens) else []) + ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(WORDS[i] for i in ids if not (skip_special_tokens and i < 2))


class LookupLM(torch.nn.Module):
    """The next-token logits depend only on the current token: ``argmax = table[token]``."""

    def __init__(self, table: dict[str, str]):
        super().__init__()
        self.emb = torch.nn.Embedding(len(WORDS), len(WORDS))
        with torch.no_grad():
            self.emb.weight.zero_()
            for src, dst in table.items():
                self.emb.weight[WORDS.index(src), WORDS.index(dst)] = 1.0
        self.seen_masks = []

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        self.seen_masks.append(attention_mask.clone())
        return SimpleNamespace(logits=self.emb(input_ids))


TABLE = {"is": "Rome", "Rome": "big", "capital": "nice", "has": "Paris", "<bos>": "the", "<pad>": "city"}
REQUESTS = [
    EditRequest(prompt="the capital of {} is", subject="France", target_new="Rome city",
                rephrase_prompts=("France capital is", "France has capital"),
                neighborhood_prompts=("Italy capital is",), neighborhood_targets=("Paris",)),
    EditRequest(prompt="{} is", subject="Italy", target_new="Rome"),
]


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_accuracy_by_hand(bos, batch_size):
    tok = WordTokenizer(bos)
    model = LookupLM(TABLE)
    res = evaluate(model, tok, REQUESTS, batch_size=batch_size, per_request=True)
    # request 0: efficacy 1/2; rephrases 1/2 ('is'->Rome) and 0 ('capital'->nice): 1/4; neighbour 'is'->Rome != Paris: 0
    # request 1: "Italy is" + " Rome": 1
    assert res["per_request"] == [
        {"efficacy": 0.5, "generalization": 0.25, "specificity": 0.0},
        {"efficacy": 1.0, "generalization": None, "specificity": None},
    ]
    assert res["efficacy"] == 0.75 and res["generalization"] == 0.25 and res["specificity"] == 0.0
    assert res["counts"] == {"efficacy": 2, "generalization": 1, "specificity": 1}
    assert res["prompts"] == {"efficacy": 2, "generalization": 2, "specificity": 1}
    assert res["n_requests"] == 2
    # Right padding with a mask: every batch's rows are left-aligned and the mask marks the real tokens.
    for mask in model.seen_masks:
        lengths = mask.sum(1)
        for row, n in zip(mask, lengths):
            assert row[:n].all() and not row[n:].any()


def test_special_prefix_read_from_the_tokenizer():
    assert special_prefix(WordTokenizer(bos=True)) == [1]
    assert special_prefix(WordTokenizer(bos=False)) == []
    from tests.editing.fixtures import tiny_tokenizer

    with_bos = tiny_tokenizer(bos=True)
    assert special_prefix(with_bos) == [with_bos.convert_tokens_to_ids("<s>")]
    assert special_prefix(tiny_tokenizer(bos=False)) == []


def test_locality_against_reference():
    tok = WordTokenizer(False)
    model = LookupLM(TABLE)
    ref = neighborhood_predictions(model, tok, REQUESTS)
    assert ref == [[[WORDS.index("Rome")]], []]
    assert evaluate(model, tok, REQUESTS, reference=ref)["locality"] == 1.0
    changed = LookupLM({**TABLE, "is": "Paris"})
    res = evaluate(changed, tok, REQUESTS, reference=ref)
    assert res["locality"] == 0.0 and res["specificity"] == 1.0 and res["counts"]["locality"] == 1
    with pytest.raises(ValueError, match="reference has 1 entries but there are 2 requests"):
        evaluate(model, tok, REQUESTS, reference=ref[:1])


@pytest.fixture(scope="module")
def tiny_llama_and_tokenizers():
    from tests.editing.fixtures import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(bos=False)
    tok_bos = tiny_tokenizer(bos=True)
    return tiny_model("llama", tok, hidden=64, intermediate=128, layers=2, heads=2, seed=1), tok, tok_bos


@pytest.mark.parametrize("bos", [False, True])
def test_batched_matches_per_example_loop(tiny_llama_and_tokenizers, bos):
    """Batched, right-padded predictions equal part A's unpadded per-example loop."""
    from tests.editing.fixtures import counterfact_requests, teacher_forced_top1

    model, tok, tok_bos = tiny_llama_and_tokenizers
    tok = tok_bos if bos else tok
    reqs = counterfact_requests(7)
    preds = teacher_forced_predictions(model, tok, [r.text for r in reqs], [r.target_new for r in reqs], batch_size=3)
    singles = teacher_forced_predictions(model, tok, [r.text for r in reqs], [r.target_new for r in reqs], batch_size=1)
    assert preds == singles
    hits = sum(int(a == b) for p, t in preds for a, b in zip(p, t))
    total = sum(len(t) for _, t in preds)
    assert hits / total == pytest.approx(teacher_forced_top1(model, tok, reqs), abs=0)
    # The BOS-aware prompt really differs: one more input token at the front.
    assert all(len(t) == len(tok(" " + r.target_new, add_special_tokens=False)["input_ids"]) for (_, t), r in zip(preds, reqs))


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2, rel=1e-12)
    assert ngram_entropy("x") == 0.0
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("a, b.") > 0  # punctuation marks are words


def test_generation_and_fluency(tiny_llama_and_tokenizers):
    model, tok, _ = tiny_llama_and_tokenizers
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is"]
    texts = generate(model, tok, prompts, max_new_tokens=4)
    assert [t.startswith(p) for t, p in zip(texts, prompts)] == [True, True]
    assert texts == generate(model, tok, prompts, max_new_tokens=4, batch_size=1)  # left padding is transparent
    replies = generate(model, tok, prompts, max_new_tokens=4, continuation=True)
    assert [p + r for p, r in zip(prompts, replies)] == texts and all(replies)
    sampled = generate(model, tok, prompts[:1], max_new_tokens=4, sample=True, seed=5)
    assert sampled == generate(model, tok, prompts[:1], max_new_tokens=4, sample=True, seed=5)
    reqs = [EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")]
    res = evaluate(model, tok, reqs, fluency=True, fluency_tokens=4)
    assert res["fluency"] == pytest.approx(ngram_entropy(texts[0]))
    assert "fluency" not in evaluate(model, tok, reqs)
    both = fluency_score(model, tok, prompts, max_new_tokens=4)
    assert both == pytest.approx((ngram_entropy(texts[0]) + ngram_entropy(texts[1])) / 2)
    assert fluency_score(model, tok, [], max_new_tokens=4) is None


def test_layer_energies_by_hand():
    """fp32 weights against a float64 sum by hand, within the fp32 evaluation's bound (energy_interval)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, generator=g)
    U = W.double() / W.double().norm(dim=1, keepdim=True)
    eps = 1e-6

    def by_hand(s):
        return sum((float((U[i] - U[j]).pow(2).sum()) + eps) ** (-s / 2) for i in range(5) for j in range(5) if i != j)

    for s in (2.0, 1.0):
        out = layer_energies({"a": W, "b": 3 * W}, s=s)
        for name, weight in (("a", W), ("b", 3 * W)):  # scale-free: rows are normalised
            lo, hi = energy_interval(weight, s, eps)
            assert lo <= by_hand(s) <= hi and lo <= out[name] <= hi, (s, name)


def test_errors():
    tok = WordTokenizer(False)
    model = LookupLM(TABLE)
    with pytest.raises(ValueError, match="requests is empty"):
        evaluate(model, tok, [])
    with pytest.raises(ValueError, match="got 1 prompts but 2 targets"):
        teacher_forced_predictions(model, tok, ["is"], ["Rome", "city"])
    with pytest.raises(ValueError, match="no tokens and the tokenizer adds no BOS"):
        teacher_forced_predictions(model, tok, [""], ["Rome"])
