"""FT: fine-tuning of the edited MLP output weight(s) on the batch's targets.

As the public SPHERE code's FT baseline: Adam on the edited weights only
(``lr``, ``num_steps``, ``weight_decay``; the public Llama3-8B settings are
layer 21, 25 steps, lr 5e-4), no step once the loss is below 1e-2, and an
optional L-infinity constraint ``norm_constraint`` that clamps every entry to
within epsilon of its value before the batch. ``objective_optimization`` picks
the loss, each a mean over requests:

- ``"prompt_last"`` (FT-L, the public code's): the mean NLL of the target's
  tokens all read at the prompt's last position;
- ``"target_new"`` (FT-M): the target tokens' mean NLL, teacher-forced after
  the prompt.

The weights are then put back and the batch's total change is added through
the Editor, so SPHERE projects it when on. ``target_nll_*`` in the batch info
are always the teacher-forced NLLs: what the edited model says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .compute import fill, target_ids
from .model_utils import get_module, model_device, pad_token_id, right_pad
from .strategy import Batch, EditMethod

STOP_LOSS = 1e-2


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in at least float32 (bf16/fp16 models), float64 for float64 models."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def clamp_change_(W: torch.Tensor, W_start: torch.Tensor, eps: float) -> torch.Tensor:
    """Clamp W in place to ``[W_start - eps, W_start + eps]`` entry by entry."""
    return W.clamp_(min=W_start - eps, max=W_start + eps)


def target_nlls(model, tok, requests) -> torch.Tensor:
    """Each request's mean NLL of its target tokens after its prompt, teacher-forced ([n], differentiable)."""
    seqs, spans = [], []
    for req in requests:
        prompt = tok(fill(req.prompt, req.subject)[0])["input_ids"]
        target = target_ids(tok, req.target_new)
        seqs.append(prompt + target)
        spans.append((len(prompt), len(target)))
    ids, mask = right_pad(seqs, pad_token_id(tok), model_device(model))
    logits = model(input_ids=ids, attention_mask=mask).logits
    nlls = []
    for i, (start, length) in enumerate(spans):
        logp = _log_probs(logits[i, start - 1:start + length - 1])
        nlls.append(-logp.gather(1, ids[i, start:start + length, None]).mean())
    return torch.stack(nlls)


def prompt_last_nlls(model, tok, requests) -> torch.Tensor:
    """Each request's mean NLL of its target tokens read at the prompt's last position ([n], differentiable)."""
    seqs, targets = [], []
    for req in requests:
        seqs.append(tok(fill(req.prompt, req.subject)[0])["input_ids"])
        targets.append(target_ids(tok, req.target_new))
    ids, mask = right_pad(seqs, pad_token_id(tok), model_device(model))
    logits = model(input_ids=ids, attention_mask=mask).logits
    nlls = []
    for i, (seq, target) in enumerate(zip(seqs, targets)):
        logp = _log_probs(logits[i, len(seq) - 1])
        nlls.append(-logp[torch.tensor(target, device=logp.device)].mean())
    return torch.stack(nlls)


OBJECTIVES = {"prompt_last": prompt_last_nlls, "target_new": target_nlls}


class FT(EditMethod):
    """Fine-tuning of the edited weights; no key statistics."""

    name = "ft"
    label = "FT"
    uses_key_statistics = False
    uses_target_values = False

    def run_batch(self, batch: Batch) -> dict:
        hp, model = batch.hparams, batch.model
        params = [get_module(model, name).weight for name in batch.module_names]
        start = {name: batch.weight(name).clone() for name in batch.module_names}
        grad_flags = {p: p.requires_grad for p in model.parameters()}
        losses = []
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
            objective = OBJECTIVES[hp.objective_optimization]
            with torch.no_grad():
                nll_before = target_nlls(model, batch.tokenizer, batch.requests).tolist()
            with batch.timed("solve"), torch.enable_grad():
                for step in range(hp.num_steps):
                    loss = objective(model, batch.tokenizer, batch.requests).mean()
                    losses.append(float(loss.detach()))
                    if losses[-1] < STOP_LOSS:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if hp.norm_constraint is not None:
                        with torch.no_grad():
                            for name in batch.module_names:
                                clamp_change_(batch.weight(name), start[name], hp.norm_constraint)
            with torch.no_grad():
                nll_tuned = target_nlls(model, batch.tokenizer, batch.requests).tolist()
                deltas = {name: batch.weight(name).float() - start[name].float() for name in batch.module_names}
                for name in batch.module_names:
                    batch.weight(name).copy_(start[name])
        finally:
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)
        with torch.no_grad():
            layers = {name: batch.apply(name, deltas[name]) for name in batch.module_names}
            nll_after = target_nlls(model, batch.tokenizer, batch.requests).tolist()
        return {"layers": layers, "ft_losses": losses, "target_nll_before": nll_before,
                "target_nll_tuned": nll_tuned, "target_nll_after": nll_after}
