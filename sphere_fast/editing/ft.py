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

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .compute import fill, target_ids
from .model_utils import get_module, model_device, pad_token_id, right_pad, stand_in_lower_layers, trace
from .strategy import Batch, EditMethod

STOP_LOSS = 1e-2


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in at least float32 (bf16/fp16 models), float64 for float64 models."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def clamp_change_(W: torch.Tensor, W_start: torch.Tensor, eps: float) -> torch.Tensor:
    """Clamp W in place to ``[W_start - eps, W_start + eps]`` entry by entry."""
    return W.clamp_(min=W_start - eps, max=W_start + eps)


@dataclass(frozen=True)
class _Inputs:
    """A batch tokenised once: right-padded prompt (+ target) ids, and per request the positions whose
    logits are scored and the target token scored at each."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: list[list[int]]
    targets: list[list[int]]


def _inputs(model, tok, requests, objective: str) -> _Inputs:
    seqs, positions, targets = [], [], []
    for req in requests:
        prompt = tok(fill(req.prompt, req.subject)[0])["input_ids"]
        target = target_ids(tok, req.target_new)
        if objective == "target_new":  # teacher-forced: token k read where it is predicted
            seqs.append(prompt + target)
            positions.append(list(range(len(prompt) - 1, len(prompt) + len(target) - 1)))
        else:  # prompt_last: every target token read at the prompt's last position
            seqs.append(prompt)
            positions.append([len(prompt) - 1] * len(target))
        targets.append(target)
    ids, mask = right_pad(seqs, pad_token_id(tok), model_device(model))
    return _Inputs(ids, mask, positions, targets)


def _nlls(model, inputs: _Inputs) -> torch.Tensor:
    """Each request's mean NLL over its scored positions ([n], differentiable). The LM head runs only at
    the positions scored where the model takes ``logits_to_keep``."""
    kept = sorted({p for row in inputs.positions for p in row})
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=inputs.ids, attention_mask=inputs.mask,
                       logits_to_keep=torch.tensor(kept, device=inputs.ids.device)).logits
        column = {p: k for k, p in enumerate(kept)}
    else:
        logits = model(input_ids=inputs.ids, attention_mask=inputs.mask).logits
        column = {p: p for p in kept}
    nlls = []
    for i, (row, target) in enumerate(zip(inputs.positions, inputs.targets)):
        logp = _log_probs(logits[i, [column[p] for p in row]])
        nlls.append(-logp[torch.arange(len(row)), torch.tensor(target, device=logp.device)].mean())
    return torch.stack(nlls)


def target_nlls(model, tok, requests) -> torch.Tensor:
    """Each request's mean NLL of its target tokens after its prompt, teacher-forced ([n], differentiable)."""
    return _nlls(model, _inputs(model, tok, requests, "target_new"))


def prompt_last_nlls(model, tok, requests) -> torch.Tensor:
    """Each request's mean NLL of its target tokens read at the prompt's last position ([n], differentiable)."""
    return _nlls(model, _inputs(model, tok, requests, "prompt_last"))


@contextlib.contextmanager
def frozen_lower_layers(model, layer_module_tmp: str, lowest_edited: int, inputs: _Inputs):
    """While FT steps, the layers below the lowest edited one see the same input and keep their weights:
    their output is recorded once and stand-ins return it (``model_utils.stand_in_lower_layers``), so
    each step runs only the layers from the edited one up. Forwards of ``inputs`` stay exact."""
    below = lowest_edited - 1
    if below < 0:
        yield
        return
    name = layer_module_tmp.format(below)
    templates = []
    hook = get_module(model, name).register_forward_hook(lambda mod, args, out: templates.append(out))
    try:
        with torch.no_grad(), trace(model, [name], stop=True) as rec:
            model(input_ids=inputs.ids, attention_mask=inputs.mask)
    finally:
        hook.remove()
    with stand_in_lower_layers(model, layer_module_tmp, below, templates[-1], rec[name]["output"].detach()):
        yield


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
            inputs = _inputs(model, batch.tokenizer, batch.requests, hp.objective_optimization)
            with torch.no_grad():
                nll_before = target_nlls(model, batch.tokenizer, batch.requests).tolist()
            with batch.timed("solve"), torch.enable_grad(), \
                    frozen_lower_layers(model, hp.layer_module_tmp, min(hp.layers), inputs):
                for step in range(hp.num_steps):
                    loss = _nlls(model, inputs).mean()
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
