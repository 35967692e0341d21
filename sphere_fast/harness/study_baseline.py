"""The unedited model's side of a study: baseline.json (the facts it knows, the fluency prompts, its general
abilities and edit scores), its neighbourhood predictions (in the cache), and :class:`GeneralProbe`, which
measures an edited model's general abilities against it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .datasets import load_requests
from .general_tasks import evaluate_task, load_task
from .metrics import evaluate, fluency_score, neighborhood_predictions, scored_counts, \
    teacher_forced_predictions
from .report import read_json, write_json
from .study_spec import EDIT_METRICS, StudySpec, StudySpecError, _general_text, _retention_data, _work_dir


# --------------------------------------------------------------------------- general abilities


def _text_chunks(tokenizer, text_path: Path, tokens: int, seq_len: int) -> torch.Tensor:
    # verbose=False: the text is cut into seq_len chunks below, so the tokenizer's length warning does not apply.
    ids = tokenizer(text_path.read_text()[: tokens * 12], add_special_tokens=False, verbose=False)["input_ids"][:tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise StudySpecError("general_text", f"{str(text_path)!r} holds fewer than {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def _next_token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids.to(next(model.parameters()).device)).logits[:, :-1].float(), -1)


def _perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    nll = sum(float(-_next_token_logprobs(model, chunks[i:i + batch_size])
                    .gather(-1, chunks[i:i + batch_size, 1:].unsqueeze(-1)).sum())
              for i in range(0, len(chunks), batch_size))
    return math.exp(nll / chunks[:, 1:].numel())


class GeneralProbe:
    """The general-ability measures, with the unedited model's side computed once.

    Perplexity, KL(unedited || edited) and top-1 agreement on the same WikiText-2 text need the unedited
    model's next-token distributions: rather than storing them (tokens x vocabulary), the edited
    weights are swapped for the originals for one extra forward at each evaluation.
    """

    def __init__(self, spec: StudySpec, model, tokenizer, baseline: dict, originals: dict[str, torch.Tensor]):
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.chunks = _text_chunks(tokenizer, _general_text(spec), spec.general_tokens, spec.general_seq_len)
        self.baseline = baseline
        self.originals = originals
        self.tasks = {task: load_task(task, spec.general_task_samples, seed=spec.seed) for task in spec.general_tasks}

    def _swap(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return set_weights(self.model, weights)

    def measure(self) -> dict:
        spec, bs = self.spec, max(1, self.spec.eval_batch_size // 8)
        nll = kl = agree = 0.0
        for i in range(0, len(self.chunks), bs):  # a batch at a time: tokens x vocabulary is large
            chunk = self.chunks[i:i + bs]
            edited = self._swap(self.originals)
            try:
                ref = _next_token_logprobs(self.model, chunk)
            finally:
                self._swap(edited)
            new = _next_token_logprobs(self.model, chunk)
            nll += float(-new.gather(-1, chunk[:, 1:].unsqueeze(-1)).sum())
            kl += float((ref.exp() * (ref - new)).sum())
            agree += float((ref.argmax(-1) == new.argmax(-1)).sum())
        positions = self.chunks[:, 1:].numel()
        known = self.baseline["retention"]
        preds = teacher_forced_predictions(self.model, self.tokenizer, known["prompts"], known["targets"],
                                           batch_size=spec.eval_batch_size)
        retained = sum(int(p == t) for p, t in preds) / len(preds) if preds else None
        fluency = _fluency(self.model, self.tokenizer, self.baseline["fluency_prompts"], spec)
        tasks = {task: evaluate_task(self.model, self.tokenizer, task, items,
                                     batch_size=spec.eval_batch_size)["accuracy"]
                 for task, items in self.tasks.items()}
        return {"perplexity": math.exp(nll / positions), "kl": kl / positions, "top1_agreement": agree / positions,
                "retention": retained, "fluency": fluency, **tasks}


def _fluency(model, tokenizer, prompts: Sequence[str], spec: StudySpec) -> float | None:
    """The spec's fluency of ``prompts``; None without prompts (the edited requests took every retention
    candidate's subject)."""
    return fluency_score(model, tokenizer, prompts, max_new_tokens=spec.fluency_tokens,
                         batch_size=spec.eval_batch_size)


def retention_pool(spec: StudySpec, requests: Sequence) -> list:
    """The facts retention may measure: the retention data's first ``retention_candidates`` requests whose
    subject none of ``requests`` edits (and that have a true target)."""
    import warnings

    edited_subjects = {r.subject for r in requests}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        candidates = load_requests(_retention_data(spec), limit=spec.retention_candidates, invalid="skip")
    return [c for c in candidates if c.subject not in edited_subjects and c.target_true]


def compute_baseline(spec: StudySpec, model, tokenizer, requests: Sequence) -> dict:
    """The unedited model's side: facts it knows (retention set), fluency prompts, its general abilities."""
    candidates = retention_pool(spec, requests)
    preds = teacher_forced_predictions(model, tokenizer, [c.text for c in candidates],
                                       [c.target_true for c in candidates], batch_size=spec.eval_batch_size)
    known = [c for c, (p, t) in zip(candidates, preds) if p == t][: spec.retention_max]
    fluency_prompts = [c.text for c in candidates[: spec.fluency_prompts]]
    perplexity_chunks = _text_chunks(tokenizer, _general_text(spec), spec.general_tokens, spec.general_seq_len)
    return {
        "retention": {"candidates": len(candidates), "known": len(known), "prompts": [c.text for c in known],
                      "targets": [c.target_true for c in known]},
        "fluency_prompts": fluency_prompts,
        "general": {"perplexity": _perplexity(model, perplexity_chunks, max(1, spec.eval_batch_size // 8)),
                    "kl": 0.0, "top1_agreement": 1.0,
                    "retention": 1.0 if known else None,
                    "fluency": _fluency(model, tokenizer, fluency_prompts, spec)},
        "general_tokens": int(perplexity_chunks.numel()),
    }


# --------------------------------------------------------------------------- baseline


def set_weights(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy ``weights`` (module name -> [out, in] weight) into ``model``; returns copies of what they replaced."""
    from ..editing.model_utils import get_module, oriented_weight

    old = {}
    with torch.no_grad():
        for name, w in weights.items():
            current = oriented_weight(get_module(model, name))
            old[name] = current.clone()
            current.copy_(w)
    return old


def _pooled_means(a: dict, counts_a: dict, b: dict, counts_b: dict) -> dict:
    """Per-request means over two sets of requests from each set's means and counts."""
    pooled = {}
    for k in EDIT_METRICS:
        parts = [(m[k], c[k]) for m, c in ((a, counts_a), (b, counts_b)) if m.get(k) is not None and c.get(k)]
        n = sum(c for _, c in parts)
        pooled[k] = sum(v * c for v, c in parts) / n if n else None
    return pooled


def prepare(spec: StudySpec, out: Path, requests: Sequence, load: Callable[[], tuple],
            log: Callable[[str], None] = print):
    """Model, tokenizer, baseline (computed once) and the unedited neighbourhood predictions."""
    model, tokenizer = load()
    baseline_path = out / "baseline.json"
    ref_path = _work_dir(spec, out) / "reference.json"
    if baseline_path.exists():
        # The baseline is the study's record and stays; the reference lives in the cache, which a new
        # machine lacks: it is computed again there.
        baseline = read_json(baseline_path)
        reference = read_json(ref_path) if ref_path.exists() else []
        scored = baseline.get("edit_requests", len(reference) or len(requests))  # older: the reference's length
        if scored < len(requests) or len(reference) < len(requests):  # a longer horizon, or a new machine
            log(f"[study] the unedited model on requests {min(scored, len(reference))}-{len(requests)} "
                f"({'the horizon grew' if scored < len(requests) else 'its predictions are not in this cache'})")
            reference = reference + neighborhood_predictions(model, tokenizer, requests[len(reference):],
                                                             batch_size=spec.eval_batch_size)
            if scored < len(requests):  # the baseline first: a stop before the reference is written redoes only it
                added = evaluate(model, tokenizer, requests[scored:], batch_size=spec.eval_batch_size,
                                 reference=reference[scored:])
                baseline["edit_metrics"] = _pooled_means(baseline["edit_metrics"], scored_counts(requests[:scored]),
                                                         added, added["counts"])
                baseline["edit_requests"] = len(requests)
                baseline["retention"]["candidates"] = len(retention_pool(spec, requests))
                write_json(baseline_path, baseline)
            write_json(ref_path, reference)
    else:
        log(f"[study] the unedited model: neighbourhood predictions on {len(requests)} requests, general abilities")
        t0 = time.perf_counter()
        reference = neighborhood_predictions(model, tokenizer, requests, batch_size=spec.eval_batch_size)
        t1 = time.perf_counter()
        metrics = evaluate(model, tokenizer, requests, batch_size=spec.eval_batch_size, reference=reference)
        t2 = time.perf_counter()
        baseline = compute_baseline(spec, model, tokenizer, requests)
        baseline["edit_metrics"] = {k: metrics[k] for k in EDIT_METRICS}
        baseline["edit_requests"] = len(requests)
        baseline["seconds"] = {"neighbourhood": t1 - t0, "evaluate_all": t2 - t1,
                               "evaluate_per_request": (t2 - t1) / len(requests),
                               "general": time.perf_counter() - t2}
        write_json(ref_path, reference)
        write_json(baseline_path, baseline)
    missing = [task for task in spec.general_tasks if task not in baseline["general"]]
    if missing:  # tasks added to a study under way: the unedited model's scores, once
        log(f"[study] the unedited model on {', '.join(missing)} ({spec.general_task_samples} items each)")
        for task in missing:
            items = load_task(task, spec.general_task_samples, seed=spec.seed)
            baseline["general"][task] = evaluate_task(model, tokenizer, task, items,
                                                      batch_size=spec.eval_batch_size)["accuracy"]
        write_json(baseline_path, baseline)
    return model, tokenizer, baseline, reference
