"""Request tokenisation, context templates and keys, as in the public MEMIT/AlphaEdit code.

* Context templates: ``"{}"`` plus short texts sampled from the model after
  "The", "Therefore", "Because", "I", "You" (top-k sampling with a seeded
  generator), each followed by ``". {}"``.
* Keys: the input of the rewritten module at the subject's last token
  (``fact_token="subject_last"``) or the prompt's last token (``"last"``),
  averaged within each template group, then across groups.
Batches are right-padded. The target values z are optimised in :mod:`.targets`.

Keys and layer outputs stop the forward after the last module they read: the
layers above cannot change them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .hparams import EditHparams
from .model_utils import model_device, pad_token_id, right_pad, trace
from .requests import EditRequest

TEMPLATE_PREFIXES = ("The", "Therefore", "Because", "I", "You")
KL_PROMPTS = ("{} is a",)


def fill(template: str, subject: str) -> tuple[str, int, int]:
    """``template`` with ``{}`` replaced by ``subject``; returns (text, subject start, subject end)."""
    at = template.index("{}")
    text = template[:at] + subject + template[at + 2:]
    return text, at, at + len(subject)


def subject_token_index(tok, text: str, start: int, end: int, ids: list[int] | None = None) -> int | None:
    """Index of the subject's last token, or None when the subject does not end on a token boundary.

    Fast tokenizers use character offsets; others compare the tokens of the
    text up to the subject's end with those of the whole text.
    """
    if getattr(tok, "is_fast", False):
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        for i, (s, e) in enumerate(offsets):
            if s < end <= e and e > s:
                # A token running past the subject mixes in the following text.
                return i if e == end or not text[end:e].strip() else None
        return None
    prefix_ids = tok(text[:end])["input_ids"]
    full_ids = ids if ids is not None else tok(text)["input_ids"]
    if prefix_ids and full_ids[:len(prefix_ids)] == prefix_ids:
        return len(prefix_ids) - 1
    return None


def lookup_index(tok, template: str, subject: str, fact_token: str) -> tuple[list[int], int]:
    """Token ids of the filled template and the position whose representation is read."""
    text, start, end = fill(template, subject)
    ids = tok(text)["input_ids"]
    if fact_token == "last":
        return ids, len(ids) - 1
    idx = subject_token_index(tok, text, start, end, ids)
    if idx is None:
        raise ValueError(f"subject {subject!r} does not tokenise inside the prompt {text!r}")
    return ids, idx


def target_ids(tok, target: str) -> list[int]:
    """Target tokens with the leading space; no BOS (added tokens come from the prompt side only)."""
    if not target.strip():
        raise ValueError("target is empty")
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def validate_request(tok, request: EditRequest, fact_token: str, where: str) -> None:
    """Raise ValueError naming the request when it cannot be edited."""
    if not isinstance(request, EditRequest):
        raise TypeError(f"{where}: expected EditRequest, got {type(request).__name__}")
    try:
        request.validate()
        target_ids(tok, request.target_new)
        lookup_index(tok, request.prompt, request.subject, fact_token)
        for tmpl in KL_PROMPTS:
            lookup_index(tok, tmpl, request.subject, fact_token)
    except ValueError as exc:
        raise ValueError(f"{where} (case_id {request.case_id!r}): {exc}") from None


@torch.no_grad()
def context_templates(model, tok, *, seed: int = 0, length: int = 10, n_per_prefix: int = 1, top_k: int = 5
                      ) -> list[list[str]]:
    """``[["{}"], [sampled ". {}" templates]]``: each prefix and ``length`` new tokens (docs/editing.md: how
    the public code's differ); deterministic for a given model and seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = model_device(model)
    out = []
    for prefix in TEMPLATE_PREFIXES:
        for _ in range(n_per_prefix):
            ids = tok(prefix)["input_ids"]
            n_prompt = len(ids)
            for _ in range(length):
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
                top = torch.topk(logits, min(top_k, logits.numel()))
                probs = torch.softmax(top.values, -1)
                ids.append(int(top.indices[torch.multinomial(probs, 1, generator=gen)]))
            text = tok.decode(ids[:n_prompt] + ids[n_prompt:], skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return [["{}"], out]


def _forward_at(model, names: Sequence[str], seqs: list[list[int]], idxs: list[int], pad_id: int, *,
                inputs: bool) -> dict[str, torch.Tensor]:
    """Input (or output) of every named module at one position per sequence; the forward stops after the last one."""
    ids, mask = right_pad(seqs, pad_id, model_device(model))
    with trace(model, names, inputs=inputs, outputs=not inputs, stop=True) as rec:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    out = {}
    for name in names:
        reps = rec[name]["input" if inputs else "output"]
        rows = torch.arange(len(seqs), device=reps.device)
        out[name] = reps[rows, torch.tensor(idxs, device=reps.device)]
    return out


@torch.no_grad()
def compute_keys(model, tok, requests: Sequence[EditRequest], hp: EditHparams, module_names: Sequence[str],
                 templates: list[list[str]], *, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Keys ``[n_requests, d_in]`` (float32, on each module's device) for every named module."""
    flat = [ctx for group in templates for ctx in group]
    seqs, idxs = [], []
    for req in requests:
        for ctx in flat:
            ids, idx = lookup_index(tok, ctx.replace("{}", req.prompt, 1), req.subject, hp.fact_token)
            seqs.append(ids)
            idxs.append(idx)
    pad_id = pad_token_id(tok)
    parts = [_forward_at(model, module_names, seqs[i:i + chunk], idxs[i:i + chunk], pad_id, inputs=True)
             for i in range(0, len(seqs), chunk)]
    sizes = [len(g) for g in templates]
    out = {}
    for name in module_names:
        reps = torch.cat([p[name] for p in parts]).float().view(len(requests), len(flat), -1)
        groups, at = [], 0
        for size in sizes:
            groups.append(reps[:, at:at + size].mean(1))
            at += size
        out[name] = torch.stack(groups, 1).mean(1)
    return out


@torch.no_grad()
def layer_outputs(model, tok, requests: Sequence[EditRequest], hp: EditHparams, layer: int) -> torch.Tensor:
    """Output of ``layer_module_tmp`` at the lookup token of each bare prompt: ``[n, hidden]`` float32."""
    seqs, idxs = zip(*(lookup_index(tok, r.prompt, r.subject, hp.fact_token) for r in requests))
    name = hp.layer_module_tmp.format(layer)
    return _forward_at(model, [name], list(seqs), list(idxs), pad_token_id(tok), inputs=False)[name].float()
