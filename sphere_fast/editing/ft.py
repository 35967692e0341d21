"""FT-L: fine-tuning of the edited MLP output weight(s) on the batch's targets.

As the public SPHERE code's FT baseline (ROME's FT-L): Adam on the edited
weights only (``lr``, ``num_steps``; the public Llama3-8B settings are layer 21,
25 steps, lr 5e-4), no step once the loss is below 1e-2, and an optional
L-infinity constraint ``norm_constraint`` that clamps every entry to within
epsilon of its value before the batch. The loss is the mean over requests of
the target tokens' mean NLL, teacher-forced after the prompt. The weights are
then put back and the batch's total change is added through the Editor, so
SPHERE projects it when on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .compute import fill, target_ids
from .model_utils import get_module, model_device, pad_token_id, right_pad
from .strategy import Batch, EditMethod

STOP_LOSS = 1e-2


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
        logp = F.log_softmax(logits[i, start - 1:start + length - 1].float(), dim=-1)
        nlls.append(-logp.gather(1, ids[i, start:start + length, None]).mean())
    return torch.stack(nlls)


class FT(EditMethod):
    """Fine-tuning of the edited weights; no key statistics."""

    name = "ft"
    uses_key_statistics = False

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
            opt = torch.optim.Adam(params, lr=hp.lr)
            with batch.timed("solve"), torch.enable_grad():
                for step in range(hp.num_steps):
                    nlls = target_nlls(model, batch.tokenizer, batch.requests)
                    if step == 0:
                        nll_before = nlls.detach().tolist()
                    loss = nlls.mean()
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
