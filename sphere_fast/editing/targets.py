"""Target values z, as in the public MEMIT/AlphaEdit compute_z.

z is the edited layer's output h at the subject's last token plus a residual
delta optimised so that the new target (with a leading space) becomes likely,
with a KL term on "{subject} is a" prompts, weight decay ||delta|| / ||h||^2
and the norm clamp ||delta|| <= clamp_norm_factor ||h||. What it runs is a
:class:`TargetPlan`, built from the hparams by :meth:`TargetPlan.from_hparams`.
Prompts are token ids, never re-tokenised after concatenation with the target.

Work that cannot change the result is skipped, so results are those of
re-running the whole model at every step, to rounding: the optimisation records
the edited layer's output once and replaces the layers up to it by stand-ins,
feeds each prompt only from its lookup token on (the positions before it do not
depend on delta; their keys and values come from a cache recorded once),
applies the LM head only where the loss reads it, cuts KL prompts after their
lookup token, and drops a request from the batch once it has stopped.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_positive, check_positive_int, real_number
from .compute import KL_PROMPTS, lookup_index, target_ids
from .hparams import FACT_TOKENS, EditHparams
from .model_utils import get_module, model_device, pad_token_id, right_pad, stand_in_lower_layers, trace
from .requests import EditRequest


@dataclass(frozen=True)
class TargetPlan:
    """What the target optimisation runs; comments name the hparam a field comes from where names differ.

    z is the output of layer ``layer``; the NLL reads ``loss_layer``'s output
    through ``ln_f_module`` and ``lm_head_module``. A request is evaluated at
    most ``steps`` times and takes an Adam step after each but the last.
    """

    layer: int
    loss_layer: int
    layer_module_tmp: str  # "model.layers.{}": the layer's module name
    ln_f_module: str
    lm_head_module: str
    fact_token: str  # "subject_last" or "last": where delta is added
    steps: int  # v_num_grad_steps
    lr: float  # v_lr
    weight_decay: float  # v_weight_decay
    kl_factor: float
    clamp_norm_factor: float

    def __post_init__(self) -> None:
        for name in ("layer", "loss_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TargetPlan.{name} must be a non-negative integer, got {value!r}")
        if self.loss_layer < self.layer:
            raise ValueError(f"TargetPlan.loss_layer must be >= layer ({self.layer}), got {self.loss_layer}")
        for name in ("layer_module_tmp", "ln_f_module", "lm_head_module"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"TargetPlan.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if self.layer_module_tmp.count("{}") != 1:
            raise ValueError("TargetPlan.layer_module_tmp must contain one '{}' for the layer index, "
                             f"got {self.layer_module_tmp!r}")
        check_choice(self.fact_token, "TargetPlan.fact_token", FACT_TOKENS)
        check_positive_int(self.steps, "TargetPlan.steps")
        check_positive(self.lr, "TargetPlan.lr")
        check_positive(self.clamp_norm_factor, "TargetPlan.clamp_norm_factor")
        for name in ("weight_decay", "kl_factor"):
            if real_number(getattr(self, name), f"TargetPlan.{name}") < 0:
                raise ValueError(f"TargetPlan.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_hparams(cls, hp: EditHparams) -> TargetPlan:
        """The plan of compute_z: z at the last edited layer, the loss read no lower than it."""
        layer = hp.layers[-1]
        return cls(layer=layer, loss_layer=max(hp.v_loss_layer, layer), layer_module_tmp=hp.layer_module_tmp,
                   ln_f_module=hp.ln_f_module, lm_head_module=hp.lm_head_module, fact_token=hp.fact_token,
                   steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
                   clamp_norm_factor=hp.clamp_norm_factor)

    @property
    def layer_name(self) -> str:
        return self.layer_module_tmp.format(self.layer)

    @property
    def loss_name(self) -> str:
        return self.layer_module_tmp.format(self.loss_layer)


@dataclass
class TargetResult:
    z: torch.Tensor  # [hidden] float32, on the z layer's device
    init: torch.Tensor  # the unedited output h
    nll_before: float
    nll_after: float
    steps: int


def compute_targets(model, tok, requests: Sequence[EditRequest], plan: TargetPlan, templates: list[list[str]],
                    *, group: int = 20) -> list[TargetResult]:
    """Target values for every request, ``group`` requests per forward pass.

    Each request keeps its own delta, loss, early stop and norm clamp, exactly
    as when optimised alone (the public compute_z): rows of a batch do not
    interact, Adam is element-wise, and a request that has stopped leaves the
    batch (its delta is held fixed).
    """
    check_positive_int(group, "group")
    out: list[TargetResult] = []
    for start in range(0, len(requests), group):
        out.extend(_compute_group(model, tok, list(requests[start:start + group]), plan, templates))
    return out


@dataclass
class _Row:
    """One prompt of the optimisation: a rewriting prompt (context + prompt + target but its last
    token, read at the target tokens) or a KL prompt (cut after its lookup token, the one read)."""
    ids: list[int]
    lookup: int  # where delta is added
    owner: int  # index of the request
    target: list[int]  # rewriting prompts: the target ids, predicted from position label_start on; [] for KL prompts
    label_start: int = -1


def _target_rows(tok, requests: list[EditRequest], fact_token: str, templates) -> tuple[list[_Row], list[_Row]]:
    rewriting, kl = [], []
    for r, req in enumerate(requests):
        tgt = target_ids(tok, req.target_new)
        for group in templates:
            for ctx in group:
                ids, idx = lookup_index(tok, ctx.replace("{}", req.prompt, 1), req.subject, fact_token)
                rewriting.append(_Row(ids + tgt[:-1], idx, r, tgt, len(ids) - 1))
        for tmpl in KL_PROMPTS:
            ids, idx = lookup_index(tok, tmpl, req.subject, fact_token)
            kl.append(_Row(ids[:idx + 1], idx, r, []))
    return rewriting, kl


def _cache_argument(body) -> str | None:
    """The keyword under which ``body.forward`` takes a key/value cache, if any."""
    params = inspect.signature(body.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


class _Steps:
    """Runs the rows of one group from the edited layer up, for the requests still optimised.

    Layer ``layer``'s output h (where delta is added) is recorded once, in a
    forward of the whole rows without gradients. Positions before a row's
    lookup token do not depend on delta (the model is causal), so when the
    model returns a key/value cache (a transformers ``DynamicCache``) a step
    feeds each row only from its lookup token on ("window"), attending to the
    keys and values recorded for the positions before; otherwise it feeds the
    whole row. Layers up to ``layer`` are replaced by stand-ins that return h
    (``model_utils.stand_in_lower_layers``) where they sit in a ``ModuleList``.
    The first step checks the window against the recorded forward (delta is
    zero then) and falls back to whole rows if they disagree.
    """

    def __init__(self, model, tok, rows: list[_Row], layer_name: str, loss_name: str):
        self.model, self.rows = model, rows
        self.layer_name, self.loss_name = layer_name, loss_name
        self.body = model.base_model
        self.has_body = self.body is not model
        device = model_device(model)
        ids, mask = right_pad([row.ids for row in rows], pad_token_id(tok), device)
        self.ids, self.width = ids, ids.shape[1]
        self.lengths = torch.tensor([len(row.ids) for row in rows])
        self.lookups = torch.tensor([row.lookup for row in rows])
        cache_arg = _cache_argument(self.body) if self.has_body else None
        templates = []
        hook = get_module(model, layer_name).register_forward_hook(lambda mod, args, out: templates.append(out))
        try:
            with torch.no_grad(), trace(model, [layer_name, loss_name]) as rec:
                kwargs = {"use_cache": True} if cache_arg else {"use_cache": False}
                out = (self.body if self.has_body else model)(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            hook.remove()
        self.h = rec[layer_name]["output"].detach()
        self.template = templates[-1]
        # What the first step must reproduce: loss-layer outputs at the label positions, final states at KL lookups.
        self.reference = rec[loss_name]["output"].detach()
        self.reference_final = (out.last_hidden_state if self.has_body else out.logits).detach()
        self.kv = self._recorded_cache(out, cache_arg)
        self.cache_arg = cache_arg
        self.windowed = self.kv is not None
        self.stand_in = None
        self.select({row.owner for row in rows})

    def _recorded_cache(self, out, cache_arg):
        if cache_arg is None:
            return None
        try:
            from transformers import DynamicCache
        except ImportError:  # pragma: no cover - transformers always ships it
            return None
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if type(cache) is not DynamicCache:
            return None
        kv = [(entry[0], entry[1]) for entry in cache]
        # A sliding-window layer keeps fewer positions than the rows hold: feed whole rows instead.
        if not kv or any(k is None or k.shape[-2] != self.width or v.shape[-2] != self.width for k, v in kv):
            return None
        window = getattr(self.model.config, "sliding_window", None)
        if isinstance(window, int) and window < self.width:
            return None
        return kv

    def select(self, requests) -> None:
        """Run only the rows of ``requests`` (indices) from now on (rewriting rows first, as in ``rows``)."""
        wanted = set(requests)
        sel = [i for i, row in enumerate(self.rows) if row.owner in wanted]
        self.requests = wanted
        self.sel = sel
        idx = torch.tensor(sel)
        starts = self.lookups[idx] if self.windowed else torch.zeros(len(sel), dtype=torch.long)
        lengths = self.lengths[idx]
        span = int((lengths - starts).max())
        cols = torch.arange(span)
        valid = cols[None, :] < (lengths - starts)[:, None]
        at = (starts[:, None] + cols[None, :]).clamp(max=self.width - 1)  # positions; padding slots repeat the last
        dev = self.ids.device
        self.pos = at.to(dev)
        self.input_ids = self.ids[idx.to(dev)].gather(1, at.to(dev))
        h = self.h[idx.to(self.h.device)]
        self.window_h = h[torch.arange(len(sel), device=h.device)[:, None], at.to(h.device)]
        if self.windowed:
            past = torch.arange(self.width)[None, :] < starts[:, None]
            self.mask = torch.cat([past, valid], 1).long().to(dev)
            self.sel_kv = [(k[idx.to(k.device)], v[idx.to(v.device)]) for k, v in self.kv]
        else:
            self.mask = valid.long().to(dev)
        self.starts = starts
        # Where delta goes and where the loss reads, in window coordinates.
        self.edit_rows = torch.arange(len(sel))
        self.edit_cols = self.lookups[idx] - starts
        self.owner = torch.tensor([self.rows[i].owner for i in sel])
        lab_row, lab_pos, lab_tok, kl_row = [], [], [], []
        for k, i in enumerate(sel):
            row = self.rows[i]
            if row.target:
                first = row.label_start - int(starts[k])
                lab_row += [k] * len(row.target)
                lab_pos += range(first, first + len(row.target))
                lab_tok += row.target
            else:
                kl_row.append(k)
        self.n_rewriting = len(sel) - len(kl_row)
        self.target_len = torch.tensor([float(len(self.rows[i].target)) for i in sel[:self.n_rewriting]])
        self.lab_row, self.lab_pos, self.lab_tok = torch.tensor(lab_row), torch.tensor(lab_pos), torch.tensor(lab_tok)
        self.kl_row = torch.tensor(kl_row, dtype=torch.long)
        self.kl_index = torch.tensor([sel[k] for k in kl_row], dtype=torch.long)  # into all rows
        if self.stand_in is not None:
            self.stand_in.hidden = self.window_h

    def forward(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss-layer output at every label position, final state at every KL lookup) with ``delta`` added."""
        rows_at = {}

        def edit(name, h):
            if name != self.layer_name:
                return None
            dev = h.device
            if dev not in rows_at:
                rows_at[dev] = (self.edit_rows.to(dev), self.edit_cols.to(dev), self.owner.to(dev))
            rows, cols, owner = rows_at[dev]
            h = h.clone()
            h[rows, cols] = h[rows, cols] + delta[owner.to(delta.device)].to(dev, h.dtype)
            return h

        kwargs = {"input_ids": self.input_ids, "attention_mask": self.mask, "position_ids": self.pos}
        if self.windowed:
            from transformers import DynamicCache

            kwargs[self.cache_arg] = DynamicCache(self.sel_kv)
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        with trace(self.model, [self.layer_name, self.loss_name], edit=edit) as rec:
            out = (self.body if self.has_body else self.model)(**kwargs)
        final = out.last_hidden_state if self.has_body else out.logits
        loss_h = rec[self.loss_name]["output"]
        labels = loss_h[self.lab_row.to(loss_h.device), self.lab_pos.to(loss_h.device)]
        kl = final[self.kl_row.to(final.device), self.edit_cols[self.kl_row].to(final.device)]
        return labels, kl

    def agrees(self, labels: torch.Tensor, kl: torch.Tensor) -> bool:
        """Whether a delta-free step matches the recorded forward at the positions the loss reads."""
        sel = torch.tensor(self.sel)
        ref = self.reference[sel[self.lab_row].to(self.reference.device),
                             (self.lab_pos + self.starts[self.lab_row]).to(self.reference.device)]
        ref_kl = self.reference_final[self.kl_index.to(self.reference_final.device),
                                      self.lookups[self.kl_index].to(self.reference_final.device)]

        def close(a, b):
            # Other shapes round differently: fp32 within ~1e-6, 16-bit types within ~1e-2; a wrong
            # position or mask is off by order one.
            tol = 1e-3 if b.dtype in (torch.float32, torch.float64) else 5e-2
            return bool((a.detach().float().to(b.device) - b.float()).norm() <= tol * b.float().norm() + 1e-6)

        agree = close(labels, ref) and close(kl, ref_kl)
        self.reference = self.reference_final = None  # needed once
        return agree

    def whole_rows(self) -> None:
        """Give up the window: feed whole rows from now on."""
        self.windowed = False
        self.kv = self.sel_kv = None
        self.select(self.requests)


class _Objective:
    """Each request's loss in the public compute_z: the target's NLL, the KL term and weight decay.

    ``terms`` reads a step's outputs (from :meth:`_Steps.forward`); ``loss``
    adds the KL divergence from ``kl_reference`` (the log-probabilities at the
    KL lookups with delta = 0) and the weight decay ``||delta|| / ||h||^2``.
    All are ``[n_requests]`` vectors; rows of requests that left the batch add nothing.
    """

    def __init__(self, model, plan: TargetPlan, runner: "_Steps", rewriting: list[_Row], kl_rows: list[_Row],
                 init: torch.Tensor):
        self.runner, self.init = runner, init
        self.ln_f = get_module(model, plan.ln_f_module)
        self.lm_head = get_module(model, plan.lm_head_module)
        self.kl_factor, self.weight_decay = plan.kl_factor, plan.weight_decay
        self.n = init.shape[0]
        self.n_rewriting_rows = len(rewriting)
        self.rw_count = torch.bincount(torch.tensor([row.owner for row in rewriting]), minlength=self.n).float()
        self.kl_count = torch.bincount(torch.tensor([row.owner for row in kl_rows]), minlength=self.n).float()

    def terms(self, labels: torch.Tensor, kl_final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-request NLL of the target, log-probabilities at the selected KL lookups)."""
        runner, n = self.runner, self.n
        logp = torch.log_softmax(self.lm_head(self.ln_f(labels)).float(), -1)
        dev = logp.device
        picked = logp.gather(1, runner.lab_tok.to(dev).unsqueeze(1)).squeeze(1)
        # NLL: mean over each rewriting prompt's target tokens, then over the request's prompts.
        nll_rows = torch.zeros(runner.n_rewriting, device=dev).index_add(0, runner.lab_row.to(dev), -picked)
        nll_rows = nll_rows / runner.target_len.to(dev)
        nll = torch.zeros(n, device=dev).index_add(0, runner.owner[:runner.n_rewriting].to(dev),
                                                     nll_rows) / self.rw_count.to(dev)
        kl_logp = torch.log_softmax((self.lm_head(kl_final) if runner.has_body else kl_final).float(), -1)
        return nll, kl_logp

    def loss(self, nll: torch.Tensor, kl_logp: torch.Tensor, kl_reference: torch.Tensor,
             delta: torch.Tensor) -> torch.Tensor:
        runner, n = self.runner, self.n
        dev = nll.device
        kl_ref = kl_reference[(runner.kl_index - self.n_rewriting_rows).to(kl_reference.device)].to(kl_logp.device)
        kl_each = F.kl_div(kl_ref, kl_logp, log_target=True, reduction="none").sum(1)
        kl_owner = runner.owner[runner.kl_row].to(kl_each.device)
        kl = self.kl_factor * (torch.zeros(n, device=kl_each.device).index_add(0, kl_owner, kl_each)
                               / self.kl_count.to(kl_each.device))
        decay = self.weight_decay * (delta.norm(dim=1) / self.init.norm(dim=1) ** 2)
        return nll + kl.to(dev) + decay.to(dev)


@contextlib.contextmanager
def _frozen_parameters(model):
    """No gradients for the model's parameters in the block (only delta is optimised)."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, req_grad in zip(model.parameters(), requires):
            p.requires_grad_(req_grad)


def _first_forward(model, runner: "_Steps", delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-0 forward (delta = 0), checked against the recorded one when the window is used."""
    outputs = runner.forward(delta)
    if runner.windowed and not runner.agrees(*outputs):
        warnings.warn(f"{type(model).__name__}: the cached-prefix forward does not reproduce the model's own; "
                      "optimising target values on whole prompts (slower, same result)", stacklevel=4)
        runner.whole_rows()
        outputs = runner.forward(delta)
    return outputs


def _initial_outputs(runner: "_Steps", rows: list[_Row], n: int) -> torch.Tensor:
    """h at each request's lookup token in its bare prompt (its first row), ``[n, hidden]`` float32."""
    first = [next(i for i, row in enumerate(rows) if row.owner == r) for r in range(n)]
    h0 = runner.h
    at = (torch.tensor(first, device=h0.device), torch.tensor([rows[i].lookup for i in first], device=h0.device))
    return h0[at].float().clone()


class _Progress:
    """Per request: whether it is still optimised, its NLL at step 0 and at its last step, its optimiser steps."""

    def __init__(self, nll_before: list[float]):
        self.active = [True] * len(nll_before)
        self.nll_before, self.nll_after = list(nll_before), list(nll_before)
        self.steps = [0] * len(nll_before)

    def update(self, losses: list[float], nlls: list[float], last_step: bool) -> list[bool]:
        """Record a step's values and return which requests take an optimiser step now: a request
        stops at loss < 5e-2 or at the last step (and keeps its delta from then on)."""
        for r, active in enumerate(self.active):
            if active:
                self.nll_after[r] = nlls[r]
                self.active[r] = not (losses[r] < 5e-2 or last_step)
                self.steps[r] += self.active[r]
        return list(self.active)


def _clamped_step(opt, delta: torch.Tensor, moving: list[bool], max_norm: torch.Tensor) -> None:
    """One Adam step for the requests that move; the others keep their delta. ||delta|| <= max_norm."""
    frozen = delta.detach().clone()
    opt.step()
    with torch.no_grad():
        mask = torch.tensor(moving, device=delta.device)
        delta[~mask] = frozen[~mask]
        norms = delta.norm(dim=1)
        scale = torch.where(mask & (norms > max_norm), max_norm / norms, torch.ones_like(norms))
        delta.mul_(scale.unsqueeze(1))


def _compute_group(model, tok, requests: list[EditRequest], plan: TargetPlan, templates) -> list[TargetResult]:
    """The target values of ``requests``, optimised together (see :func:`compute_targets`)."""
    n = len(requests)
    rewriting, kl_rows = _target_rows(tok, requests, plan.fact_token, templates)
    rows = rewriting + kl_rows
    with _frozen_parameters(model):
        runner = _Steps(model, tok, rows, plan.layer_name, plan.loss_name)
        init = _initial_outputs(runner, rows, n)
        objective = _Objective(model, plan, runner, rewriting, kl_rows, init)
        delta = torch.zeros(n, model.config.hidden_size, device=init.device, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=plan.lr)
        max_norm = plan.clamp_norm_factor * init.norm(dim=1)
        with stand_in_lower_layers(model, plan.layer_module_tmp, plan.layer, runner.template,
                                   runner.window_h) as stand_in:
            runner.stand_in = stand_in
            nll, kl_logp = objective.terms(*_first_forward(model, runner, delta))
            kl_reference = kl_logp.detach().clone()  # the unedited distribution: step 0 runs every KL row, in order
            progress = _Progress(nll.detach().cpu().tolist())
            for step in range(plan.steps):
                if step:
                    nll, kl_logp = objective.terms(*runner.forward(delta))
                opt.zero_grad()
                loss = objective.loss(nll, kl_logp, kl_reference, delta)
                moving = progress.update(loss.detach().cpu().tolist(), nll.detach().cpu().tolist(),
                                         step == plan.steps - 1)
                if not any(moving):
                    break
                loss[torch.tensor(moving, device=loss.device)].sum().backward()
                _clamped_step(opt, delta, moving, max_norm)
                if not all(moving[r] for r in runner.requests):
                    runner.select([r for r in range(n) if moving[r]])
    z = (init + delta.detach()).float()
    return [TargetResult(z=z[r], init=init[r], nll_before=progress.nll_before[r], nll_after=progress.nll_after[r],
                         steps=progress.steps[r]) for r in range(n)]
