"""The editing methods as strategies: the registry, and RECT, PRUNE and FT against float64
transcriptions of their formulas (small matrices) and on tiny models through the Editor."""
from __future__ import annotations

import math

import pytest
import torch

from sphere_fast.editing.editor import Editor
from sphere_fast.editing.ft import clamp_change_, target_nlls
from sphere_fast.editing.hparams import METHOD_NAMES, default_hparams
from sphere_fast.editing.methods import METHODS, method_class
from sphere_fast.editing.prune import PRUNE, restrained_correction
from sphere_fast.editing.rect import RECT, rect_mask

from .fixtures import subject_end_requests, tiny_model

FAST = {"mom2_n_samples": 64, "v_num_grad_steps": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def make_editor(model, tok, cache, method, *, sphere=False, **hp):
    hparams = default_hparams(model, method).replace(**{**FAST, **hp})
    return Editor(model, tok, hparams, method=method, sphere=sphere, cache_dir=cache, progress=False)


# -- registry ----------------------------------------------------------------------------------------


def test_registry_rejects_an_unknown_name_listing_the_known_ones(tok):
    assert list(METHODS) == ["memit", "alphaedit", "rect", "prune", "ft"]
    assert tuple(METHODS) == METHOD_NAMES  # default_hparams knows every registered method
    assert method_class("RECT") is RECT
    for call in (lambda: method_class("rome"),
                 lambda: Editor(tiny_model("llama", tok), tok, default_hparams(tiny_model("llama", tok), "memit"),
                                method="rome")):
        with pytest.raises(ValueError, match="memit, alphaedit, rect, prune, ft; got 'rome'"):
            call()
    with pytest.raises(ValueError, match="memit, alphaedit, rect, prune, ft; got 'rome'"):
        default_hparams(tiny_model("llama", tok), "rome")


# -- RECT ----------------------------------------------------------------------------------------------


def rect_mask_float64(delta, W):
    """The public code's rule in float64: keep entries at or above the k-th smallest relative change,
    k = int(numel * 60 / 100)."""
    rel = (delta.double().abs() / (W.double().abs() + 1e-8)).flatten()
    k = int(rel.numel() * 60 / 100)
    threshold = rel.sort().values[k - 1]
    return (rel >= threshold).reshape(delta.shape)


@pytest.mark.parametrize("shape", [(37, 53), (123, 123), (5, 2)])
def test_rect_mask_matches_the_float64_rule(shape):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(shape, generator=gen)
    scale = torch.rand(shape, generator=gen, dtype=torch.float64)
    delta = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    mask = rect_mask(delta, W)
    assert torch.equal(mask, rect_mask_float64(delta, W))
    n = delta.numel()
    assert int(mask.sum()) == n - int(n * 60 / 100) + 1  # no ties in random data: 40 % (+1, the threshold itself)
    kept = RECT(None).before_projection("w", W, delta)
    assert torch.equal(kept, torch.where(mask, delta, 0.0))


def test_rect_edits_only_the_masked_entries(tok, stats_cache):
    """Without SPHERE, each layer's weight changes in exactly 40 % (+1) of its entries."""
    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, stats_cache, "rect")
    before = {n: w.clone() for n, w in ed.edited_weights().items()}
    info = ed.edit_batch(subject_end_requests(tok, 3))
    for n, w in ed.edited_weights().items():
        changed = int((w != before[n]).sum())
        assert 0 < changed <= w.numel() - int(w.numel() * 60 / 100) + 1, n
        assert info["layers"][n]["update_norm"] > 0


# -- PRUNE ---------------------------------------------------------------------------------------------


def restrain_float64(D, sigma_max):
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    S = torch.where(S > sigma_max, S.log() - math.log(sigma_max) + sigma_max, S)
    return U @ torch.diag(S) @ Vh


def test_prune_singular_values_match_the_float64_formula():
    gen = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(41, 41, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(67, 41, generator=gen, dtype=torch.float64))
    S = torch.tensor([40.0, 12.0, 5.5, 3.0] + [0.5] * 37, dtype=torch.float64)
    D = U @ torch.diag(S) @ V.T
    correction, count = restrained_correction(D, 4.0)
    assert count == 3
    expected = restrain_float64(D, 4.0)
    assert torch.allclose(D + correction, expected, rtol=0, atol=1e-12 * float(S[0]))
    restrained = torch.linalg.svdvals(D + correction)
    assert torch.allclose(restrained[:3], torch.log(S[:3]) - math.log(4.0) + 4.0, atol=1e-12)
    zero, none = restrained_correction(D, 50.0)
    assert none == 0 and not zero.any()


def test_prune_restrains_the_accumulated_change():
    """before_projection turns this batch's delta into the one that leaves W - W0 restrained."""
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(29, 47, generator=gen, dtype=torch.float64) * 0.1
    method = PRUNE(None)
    method.start("w", W0)
    sigma_max = float(torch.linalg.matrix_norm(W0, ord=2))
    assert method.sigma_max["w"] == sigma_max
    W = W0 + torch.randn(29, 47, generator=gen, dtype=torch.float64)  # earlier batches' change
    delta = torch.randn(29, 47, generator=gen, dtype=torch.float64) * 3
    new = method.before_projection("w", W, delta)
    assert torch.allclose(W + new - W0, restrain_float64(W + delta - W0, sigma_max), atol=1e-10)
    assert method.layer_info("w")["restrained_singular_values"] > 0
    method.start("w", W)  # W0 is the weight of the first batch only
    assert torch.equal(method.W0["w"], W0)


def test_prune_on_a_model_restrains_what_memit_would_add(tok, stats_cache):
    """Edited weights scaled down so MEMIT's updates exceed sigma_max(W0): every layer's PRUNE change has
    MEMIT's singular values, compressed by the formula (the layers above saw the raw updates, as in the
    public code: update_order "after_layers"); its state holds W0."""
    changes, sigma_max = {}, {}
    for method in ("memit", "prune"):
        model = tiny_model("llama", tok)
        ed = make_editor(model, tok, stats_cache, method)
        with torch.no_grad():
            for w in ed.edited_weights().values():
                w.mul_(0.05)
        W0 = {n: w.clone() for n, w in ed.edited_weights().items()}
        info = ed.edit_batch(subject_end_requests(tok, 3))
        changes[method] = {n: (w - W0[n]).double() for n, w in ed.edited_weights().items()}
        if method == "prune":
            for name in ed.edited_module_names:
                assert info["layers"][name]["restrained_singular_values"] > 0
                state = ed.state_dict()["layers"][name]
                assert torch.equal(state["W0"], W0[name])
                sigma_max[name] = state["sigma_max"]
    for name, limit in sigma_max.items():
        memit_s = torch.linalg.svdvals(changes["memit"][name])
        expected = torch.where(memit_s > limit, memit_s.log() - math.log(limit) + limit, memit_s)
        got = torch.linalg.svdvals(changes["prune"][name])
        top = int((memit_s > 1e-3 * memit_s[0]).sum())  # the update's rank; below that fp32 rounding
        assert torch.allclose(got[:top], expected[:top], rtol=1e-4), name


# -- FT ------------------------------------------------------------------------------------------------


def test_ft_constraint_matches_the_float64_clamp():
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(31, 17, generator=gen)
    W = start + 0.1 * torch.randn(31, 17, generator=gen)
    expected = torch.minimum(torch.maximum(W.double(), start.double() - 0.03), start.double() + 0.03)
    view = W.T.clone().T  # a non-contiguous view, like GPT-2's oriented Conv1D weight
    clamp_change_(view, start, 0.03)
    assert torch.allclose(view.double(), expected, rtol=0, atol=1e-7)  # fp32 rounding of start -/+ eps
    assert float((view - start).abs().max()) <= 0.03 + 1e-7


def test_ft_fits_the_targets_within_its_constraint(tok, stats_cache):
    model = tiny_model("llama", tok)
    reqs = subject_end_requests(tok, 3)
    ed = make_editor(model, tok, stats_cache, "ft", lr=1e-2, num_steps=10, norm_constraint=2e-3)
    assert len(ed.edited_module_names) == 1  # FT-L: one layer
    before = {n: w.clone() for n, w in ed.edited_weights().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    info = ed.edit_batch(reqs)
    assert sum(info["target_nll_after"]) < sum(info["target_nll_before"]) - 0.5, info
    for n, w in ed.edited_weights().items():
        change = (w - before[n]).abs().max()
        assert 0 < float(change) <= 2e-3 * (1 + 1e-3), n
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        assert torch.allclose(target_nlls(model, tok, reqs), torch.tensor(info["target_nll_after"]))


def test_ft_with_sphere_projects_the_total_change(tok, stats_cache):
    """SPHERE on: the applied change is the projection of the fine-tuned change (alpha 0 gives FT exactly)."""
    reqs = subject_end_requests(tok, 2)
    runs = {}
    for label, kw in {"off": {"sphere": False}, "alpha0": {"sphere": True}, "on": {"sphere": True}}.items():
        model = tiny_model("llama", tok)
        hp = default_hparams(model, "ft").replace(mom2_n_samples=64, lr=1e-2, num_steps=3)
        ed = Editor(model, tok, hp, method="ft", cache_dir=stats_cache, progress=False,
                    alpha=0.0 if label == "alpha0" else None, **kw)
        start = {n: w.clone() for n, w in ed.edited_weights().items()}
        info = ed.edit_batch(reqs)
        runs[label] = ({n: w - start[n] for n, w in ed.edited_weights().items()}, info)
    for n, change in runs["off"][0].items():
        assert torch.equal(change, runs["alpha0"][0][n])
        layer = runs["on"][1]["layers"][n]
        assert layer["rank"] >= 1 and layer["projected_norm"] < layer["update_norm"]
