"""Editing metrics: efficacy, generalisation, specificity, locality, fluency, energy.

Accuracy metrics are teacher-forced top-1 token accuracy, as EasyEdit scores
both CounterFact and ZsRE and MEMIT scores ZsRE (ROME/MEMIT/AlphaEdit's own
CounterFact tables count P(new) > P(true) instead, a looser test): the prompt is
followed by the target with a leading space (``" " + target``); for every target
token, the model's arg-max at the position before it is compared with it; a
prompt scores the fraction of its target tokens predicted correctly. Per request:

* efficacy        ``prompt.format(subject)`` -> ``target_new``
* generalization  each rephrase prompt -> ``target_new`` (mean over prompts)
* specificity     each neighbourhood prompt -> its expected target (mean)
* locality        (when the unedited model's predictions are given) the
                  fraction of neighbourhood target positions where the edited
                  model's top-1 token equals the unedited model's, as EasyEdit
                  reports locality; useful on small models that do not know
                  the neighbourhood facts in the first place.

Each metric is the mean over the requests that have prompts of that kind.
Whether the tokenizer prepends special tokens (e.g. Llama's BOS) is read from
the tokenizer itself, never from the model's name.

Fluency is the n-gram entropy of generated text (ROME/MEMIT: the 2- and
3-gram entropies, in bits, weighted 2/3 and 4/3 and averaged), off by default.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch

from .._validation import check_positive_int
from ..editing.model_utils import model_device, pad_token_id, right_pad
from ..editing.requests import EditRequest
from ..ops import hyperspherical_energy

ACCURACY_METRICS = ("efficacy", "generalization", "specificity")


# --------------------------------------------------------------------------- tokenising


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before the text (e.g. ``[bos]``), read from the tokenizer."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start])
    return []


def encode_pair(tokenizer, prompt: str, target: str, prefix: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Prompt ids (with the tokenizer's special prefix) and the ids of ``" " + target``."""
    if prefix is None:
        prefix = special_prefix(tokenizer)
    prompt_ids = list(prefix) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    target_ids = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} has no tokens and the tokenizer adds no BOS: nothing to predict from")
    if not target_ids:
        raise ValueError(f"target {target!r} has no tokens")
    return prompt_ids, target_ids


def scored_logits(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at the positions ``(rows[i], cols[i])`` only: the vocabulary head runs where a token is scored.

    The head is most of a small model's forward at every position (SmolLM2: 49,152 x 576), so the
    base model's last hidden states are taken and the head applied to the scored rows alone. Models
    whose head cannot be separated (no ``base_model`` / output embeddings) run whole.
    """
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        return model(input_ids=ids, attention_mask=mask).logits[rows, cols]
    hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
    return head(hidden[rows, cols])


@torch.no_grad()
def teacher_forced_predictions(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, target): (the model's top-1 ids at the target positions, the target ids).

    Batches are right-padded with an attention mask; position ``len(prompt) - 1 + i``
    predicts target token ``i``.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets")
    check_positive_int(batch_size, "batch_size")
    prefix = special_prefix(tokenizer)
    encoded = [encode_pair(tokenizer, p, t, prefix) for p, t in zip(prompts, targets)]
    pad = pad_token_id(tokenizer)
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: list[tuple[list[int], list[int]]] = []
    starts = range(0, len(encoded), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", leave=False)
    try:
        for start in starts:
            chunk = encoded[start:start + batch_size]
            # The last target token is never an input.
            ids, mask = right_pad([p + t[:-1] for p, t in chunk], pad, device)
            rows, cols = [], []
            for row, (p, t) in enumerate(chunk):
                rows.extend([row] * len(t))
                cols.extend(range(len(p) - 1, len(p) - 1 + len(t)))
            rows_t = torch.tensor(rows, device=device)
            cols_t = torch.tensor(cols, device=device)
            top1 = scored_logits(model, ids, mask, rows_t, cols_t).argmax(-1).tolist()
            at = 0
            for p, t in chunk:
                out.append((top1[at:at + len(t)], list(t)))
                at += len(t)
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- evaluate


def _pairs(requests: Sequence[EditRequest]) -> list[tuple[int, str, str, str]]:
    """(request index, kind, prompt, target) for every prompt of every request."""
    pairs = []
    for i, req in enumerate(requests):
        pairs.append((i, "efficacy", req.text, req.target_new))
        pairs.extend((i, "generalization", p, req.target_new) for p in req.rephrase_prompts)
        pairs.extend((i, "specificity", p, t) for p, t in zip(req.neighborhood_prompts, req.neighborhood_targets))
    return pairs


def scored_counts(requests: Sequence[EditRequest]) -> dict[str, int]:
    """How many of ``requests`` :func:`evaluate` scores on each metric (with a reference): those with at
    least one prompt of its kind. No model needed."""
    kinds: dict[str, set] = {k: set() for k in ACCURACY_METRICS}
    for i, kind, _, _ in _pairs(requests):
        kinds[kind].add(i)
    counts = {k: len(v) for k, v in kinds.items()}
    counts["locality"] = counts["specificity"]
    return counts


def neighborhood_predictions(
    model, tokenizer, requests: Sequence[EditRequest], *, batch_size: int = 16, progress: bool = False
) -> list[list[list[int]]]:
    """The model's top-1 ids on every neighbourhood target position: ``[request][prompt][token]``.

    Take them from the unedited model and pass them to :func:`evaluate` as
    ``reference`` to get ``locality``. Plain lists, so they can be stored as JSON.
    """
    prompts, targets, owner = [], [], []
    for i, req in enumerate(requests):
        for p, t in zip(req.neighborhood_prompts, req.neighborhood_targets):
            prompts.append(p)
            targets.append(t)
            owner.append(i)
    preds = (teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size=batch_size, progress=progress)
             if prompts else [])
    out: list[list[list[int]]] = [[] for _ in requests]
    for i, (pred, _) in zip(owner, preds):
        out[i].append(pred)
    return out


def token_accuracy(predicted: Sequence[int], expected: Sequence[int]) -> float:
    """The share of positions where the predicted token is the expected one (teacher-forced top-1)."""
    return sum(int(a == b) for a, b in zip(predicted, expected)) / len(expected)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def fluency_score(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
                  sample: bool = False, seed: int = 0) -> float | None:
    """Mean n-gram entropy of the continuations of ``prompts`` (greedy unless ``sample``); None without
    prompts."""
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, sample=sample, seed=seed,
                     batch_size=batch_size)
    return _mean([ngram_entropy(t) for t in texts])


def evaluate(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 16,
    fluency: bool = False,
    reference: Sequence[Sequence[Sequence[int]]] | None = None,
    fluency_tokens: int = 64,
    sample: bool = False,
    seed: int = 0,
    per_request: bool = False,
    progress: bool = False,
) -> dict:
    """Efficacy, generalization, specificity (and locality, fluency) over ``requests``.

    Returns ``{"efficacy", "generalization", "specificity", ...: mean or None,
    "counts": {metric: number of requests scored}, "prompts": {metric: number
    of prompts}, "n_requests"}``; with ``per_request=True`` also
    ``"per_request": [{metric: score}]``. ``reference`` is
    :func:`neighborhood_predictions` of the unedited model on the same requests.
    """
    requests = list(requests)
    if not requests:
        raise ValueError("requests is empty: nothing to evaluate")
    if reference is not None and len(reference) != len(requests):
        raise ValueError(f"reference has {len(reference)} entries but there are {len(requests)} requests")
    pairs = _pairs(requests)
    preds = teacher_forced_predictions(
        model, tokenizer, [p for _, _, p, _ in pairs], [t for _, _, _, t in pairs], batch_size=batch_size,
        progress=progress,
    )
    scores: list[dict[str, list[float]]] = [{k: [] for k in ACCURACY_METRICS + ("locality",)} for _ in requests]
    seen_neighbors = [0] * len(requests)
    for (i, kind, _, _), (pred, tgt) in zip(pairs, preds):
        scores[i][kind].append(token_accuracy(pred, tgt))
        if kind == "specificity" and reference is not None:
            ref = list(reference[i][seen_neighbors[i]])
            if len(ref) != len(pred):
                raise ValueError(
                    f"reference for request {i}, neighbourhood prompt {seen_neighbors[i]} has {len(ref)} tokens, "
                    f"expected {len(pred)}: was it computed with another tokenizer or request list?"
                )
            scores[i]["locality"].append(token_accuracy(pred, ref))
            seen_neighbors[i] += 1
    metrics = ACCURACY_METRICS + (("locality",) if reference is not None else ())
    per = [{k: _mean(s[k]) for k in metrics} for s in scores]
    result: dict = {"n_requests": len(requests), "counts": {}, "prompts": {}}
    for k in metrics:
        vals = [p[k] for p in per if p[k] is not None]
        result[k] = _mean(vals)
        result["counts"][k] = len(vals)
        result["prompts"][k] = sum(len(s[k]) for s in scores)
    if fluency:
        result["fluency"] = fluency_score(model, tokenizer, [r.text for r in requests], max_new_tokens=fluency_tokens,
                                          batch_size=batch_size, sample=sample, seed=seed)
        result["counts"]["fluency"] = len(requests)
    if per_request:
        result["per_request"] = per
    return result


# --------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME/MEMIT's generation entropy: the weighted mean of n-gram entropies (bits) of ``text``.

    Words are ``\\w+`` runs and single punctuation marks. Text too short to
    hold an n-gram contributes entropy 0 for that n.
    """
    if len(ns) != len(weights):
        raise ValueError(f"ns has {len(ns)} entries but weights has {len(weights)}")
    words = _WORD.findall(text)
    total = 0.0
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        size = sum(counts.values())
        h = -sum((c / size) * math.log2(c / size) for c in counts.values()) if size else 0.0
        total += w * h
    return total / len(ns)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    continuation: bool = False,
) -> list[str]:
    """Prompt plus continuation for each prompt (greedy, or top-k sampling as in ROME), left-padded batches;
    with ``continuation`` only the generated text (decoded from the new tokens: whether the decoded whole
    starts with the prompt string depends on the tokenizer)."""
    prefix = special_prefix(tokenizer)
    pad = pad_token_id(tokenizer)
    device = model_device(model)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [prefix + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
            kwargs = {"do_sample": True, "top_k": top_k} if sample else {"do_sample": False}
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                pad_token_id=pad, **kwargs,
            )
            for row, seq in enumerate(chunk):
                new = out[row, width:].tolist()
                texts.append(tokenizer.decode(new if continuation else seq[len(prefix):] + new,
                                              skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return texts


# --------------------------------------------------------------------------- energy


def layer_energies(weights: dict[str, torch.Tensor], *, s: float = 2.0) -> dict[str, float]:
    """Hyperspherical energy (paper Eq. 6, Riesz ``s``) of each weight's unit-normalised rows."""
    return {name: float(hyperspherical_energy(w.detach(), s=s)) for name, w in weights.items()}
