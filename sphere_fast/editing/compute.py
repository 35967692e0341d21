"""Keys, context templates and target values z, as in the public MEMIT/AlphaEdit code.

* Context templates: ``"{}"`` plus short texts sampled from the model after
  "The", "Therefore", "Because", "I", "You" (top-k sampling with a seeded
  generator), each followed by ``". {}"``.
* Keys: the input of the rewritten module at the subject's last token
  (``fact_token="subject_last"``) or the prompt's last token (``"last"``),
  averaged within each template group, then across groups.
* Target z: the last edited layer's output at the subject's last token, plus a
  residual delta optimised so that the new target (with a leading space)
  becomes likely, with a KL term on "{subject} is a" prompts, weight decay
  ||delta|| / ||h||^2 and the norm clamp ||delta|| <= clamp_norm_factor ||h||.
Batches are right-padded; prompts are token ids, never re-tokenised after
concatenation with the target. The optimisation runs the layers up to the
edited one once (``model_utils.replay_lower_layers``) and applies the LM head
only where the loss reads it; the result is the same as re-running the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .hparams import EditHparams
from .model_utils import get_module, model_device, pad_token_id, replay_lower_layers, right_pad, trace
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
    """``[["{}"], [sampled ". {}" templates]]``; deterministic for a given model and seed."""
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


def _forward_at(model, name: str, seqs: list[list[int]], idxs: list[int], pad_id: int, *, inputs: bool):
    ids, mask = right_pad(seqs, pad_id, model_device(model))
    with trace(model, [name], inputs=inputs, outputs=not inputs) as rec:
        model(input_ids=ids, attention_mask=mask)
    reps = rec[name]["input" if inputs else "output"]
    rows = torch.arange(len(seqs), device=reps.device)
    return reps[rows, torch.tensor(idxs, device=reps.device)]


def _forward_multi(model, names: Sequence[str], seqs, idxs, pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = right_pad(seqs, pad_id, model_device(model))
    with trace(model, names, inputs=True, outputs=False) as rec:
        model(input_ids=ids, attention_mask=mask)
    out = {}
    for name in names:
        reps = rec[name]["input"]
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
    parts = [_forward_multi(model, module_names, seqs[i:i + chunk], idxs[i:i + chunk], pad_id)
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
    return _forward_at(model, name, list(seqs), list(idxs), pad_token_id(tok), inputs=False).float()


@dataclass
class TargetResult:
    z: torch.Tensor  # [hidden] float32, on the z layer's device
    init: torch.Tensor  # the unedited output h
    nll_before: float
    nll_after: float
    steps: int


def compute_targets(model, tok, requests: Sequence[EditRequest], hp: EditHparams, templates: list[list[str]],
                    *, group: int = 8) -> list[TargetResult]:
    """Target values for every request, ``group`` requests per forward pass.

    Each request keeps its own delta, loss, early stop and norm clamp, exactly
    as when optimised alone (the public compute_z): rows of a batch do not
    interact, Adam is element-wise, and rows that have stopped are held fixed.
    """
    out: list[TargetResult] = []
    for start in range(0, len(requests), group):
        out.extend(_compute_group(model, tok, list(requests[start:start + group]), hp, templates))
    return out


def compute_target(model, tok, request: EditRequest, hp: EditHparams, templates: list[list[str]]) -> TargetResult:
    """Optimise delta for one request at layer ``hp.layers[-1]`` (the public compute_z)."""
    return _compute_group(model, tok, [request], hp, templates)[0]


def _compute_group(model, tok, requests: list[EditRequest], hp: EditHparams, templates) -> list[TargetResult]:
    layer = hp.layers[-1]
    loss_layer = max(hp.v_loss_layer, layer)
    n = len(requests)
    seqs, lookups, owner = [], [], []
    label_rows = []  # (row, first label position, target ids)
    kl_seqs, kl_lookups, kl_owner = [], [], []
    first_row = []
    for r, req in enumerate(requests):
        tgt = target_ids(tok, req.target_new)
        first_row.append(len(seqs))
        for group in templates:
            for ctx in group:
                ids, idx = lookup_index(tok, ctx.replace("{}", req.prompt, 1), req.subject, hp.fact_token)
                label_rows.append((len(seqs), len(ids) - 1, tgt))
                seqs.append(ids + tgt[:-1])
                lookups.append(idx)
                owner.append(r)
        for tmpl in KL_PROMPTS:
            ids, idx = lookup_index(tok, tmpl, req.subject, hp.fact_token)
            kl_seqs.append(ids)
            kl_lookups.append(idx)
            kl_owner.append(r)
    n_rw = len(seqs)
    device = model_device(model)
    input_ids, mask = right_pad(seqs + kl_seqs, pad_token_id(tok), device)
    # Flat (row, position, token) of every target token: the loss reads logits there only.
    lab_row, lab_pos, lab_tok = [], [], []
    tgt_len = torch.zeros(n_rw)
    for row, pos, tgt in label_rows:
        lab_row += [row] * len(tgt)
        lab_pos += range(pos, pos + len(tgt))
        lab_tok += tgt
        tgt_len[row] = len(tgt)
    all_lookups = lookups + kl_lookups
    all_owner = owner + kl_owner

    layer_name = hp.layer_module_tmp.format(layer)
    loss_name = hp.layer_module_tmp.format(loss_layer)
    ln_f = get_module(model, hp.ln_f_module)
    lm_head = get_module(model, hp.lm_head_module)
    layer_device = next(get_module(model, layer_name).parameters()).device
    delta = torch.zeros(n, model.config.hidden_size, device=layer_device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict = {}
    rows_dev = torch.arange(len(all_lookups), device=layer_device)
    cols_dev = torch.tensor(all_lookups, device=layer_device)
    owner_dev = torch.tensor(all_owner, device=layer_device)

    def edit(name, h):
        if name != layer_name:
            return None
        if "init" not in state:
            state["init"] = h[torch.tensor(first_row, device=h.device),
                              torch.tensor([lookups[i] for i in first_row], device=h.device)].detach().float().clone()
        h = h.clone()
        h[rows_dev, cols_dev] = h[rows_dev, cols_dev] + delta[owner_dev].to(h.dtype)
        return h

    # Per-request averaging matrices: NLL is the mean over a request's rewriting
    # prompts, KL the batch mean over its KL prompts.
    own_rw = torch.zeros(n, n_rw)
    own_rw[torch.tensor(owner), torch.arange(n_rw)] = 1.0
    own_rw /= own_rw.sum(1, keepdim=True)
    own_kl = torch.zeros(n, len(kl_seqs))
    own_kl[torch.tensor(kl_owner), torch.arange(len(kl_seqs))] = 1.0
    own_kl /= own_kl.sum(1, keepdim=True)

    # The body without the LM head: logits are needed at a few positions only.
    body = model.base_model
    with_head = body is model

    def forward() -> torch.Tensor:
        """Final hidden states (after the final norm), or logits for a model without a separate body."""
        if with_head:
            return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        return body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    active = [True] * n
    nll_first = [float("nan")] * n
    nll_last = [float("nan")] * n
    steps = [0] * n
    try:
        # Layers up to the edited one see the same inputs every step: run them once.
        with replay_lower_layers(model, hp.layer_module_tmp, layer, forward):
            for it in range(hp.v_num_grad_steps):
                opt.zero_grad()
                with trace(model, [layer_name, loss_name], edit=edit) as rec:
                    final = forward()
                out_h = rec[loss_name]["output"]
                if it == 0:  # gather indices, on the devices that read them (layers may sit on several)
                    idx = {"kl": (torch.arange(n_rw, n_rw + len(kl_seqs), device=final.device),
                                  torch.tensor(kl_lookups, device=final.device)),
                           "at": (torch.tensor(lab_row, device=out_h.device),
                                  torch.tensor(lab_pos, device=out_h.device))}
                kl_final = final[idx["kl"]]
                kl_logp = torch.log_softmax((kl_final if with_head else lm_head(kl_final)).float(), -1)
                if "kl_init" not in state:
                    state["kl_init"] = kl_logp.detach().clone()
                logp = torch.log_softmax(lm_head(ln_f(out_h[idx["at"]])).float(), -1)
                dev = logp.device
                if it == 0:
                    idx["tok"] = torch.tensor(lab_tok, device=dev).unsqueeze(1)
                    idx["row"] = torch.tensor(lab_row, device=dev)
                picked = logp.gather(1, idx["tok"]).squeeze(1)
                nll_rows = torch.zeros(n_rw, device=dev).index_add(0, idx["row"], -picked) / tgt_len.to(dev)
                nll = own_rw.to(dev) @ nll_rows
                kl_rows_loss = F.kl_div(state["kl_init"], kl_logp, log_target=True, reduction="none").sum(1)
                kl = hp.kl_factor * (own_kl.to(dev) @ kl_rows_loss.to(dev))
                init = state["init"]
                decay = hp.v_weight_decay * (delta.norm(dim=1) / init.norm(dim=1) ** 2)
                loss = nll + kl + decay.to(dev)
                values = loss.detach().cpu().tolist()
                nll_values = nll.detach().cpu().tolist()
                step_mask = []
                for r in range(n):
                    if not active[r]:
                        step_mask.append(False)
                        continue
                    if it == 0:
                        nll_first[r] = nll_values[r]
                    nll_last[r] = nll_values[r]
                    steps[r] = it
                    if values[r] < 5e-2 or it == hp.v_num_grad_steps - 1:
                        active[r] = False
                    step_mask.append(active[r])
                if not any(step_mask):
                    break
                keep = torch.tensor(step_mask, device=dev)
                loss[keep].sum().backward()
                frozen = delta.detach().clone()
                opt.step()
                with torch.no_grad():
                    moving = torch.tensor(step_mask, device=layer_device)
                    delta[~moving] = frozen[~moving]
                    max_norm = hp.clamp_norm_factor * init.norm(dim=1)
                    norms = delta.norm(dim=1)
                    scale = torch.where(moving & (norms > max_norm), max_norm / norms, torch.ones_like(norms))
                    delta.mul_(scale.unsqueeze(1))
                    for r in range(n):
                        if step_mask[r]:
                            steps[r] = it + 1
    finally:
        for p, req_grad in zip(model.parameters(), requires):
            p.requires_grad_(req_grad)
    z = (state["init"] + delta.detach()).float()
    return [TargetResult(z=z[r], init=state["init"][r], nll_before=nll_first[r], nll_after=nll_last[r],
                         steps=steps[r]) for r in range(n)]
