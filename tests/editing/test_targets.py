"""The target optimisation's plan: built from the hparams as compute_z reads them, immutable, checked."""
from __future__ import annotations

import dataclasses

import pytest

from sphere_fast.editing.hparams import load_hparams
from sphere_fast.editing.targets import TargetPlan, compute_targets

from .fixtures import subject_end_requests, tiny_model, tiny_tokenizer


def llama3_plan() -> TargetPlan:
    return TargetPlan.from_hparams(load_hparams("AlphaEdit/llama3-8b", v_lr=0.25, kl_factor=0.125))


def test_plan_from_hparams():
    hp = load_hparams("AlphaEdit/llama3-8b", v_lr=0.25, kl_factor=0.125)
    plan = llama3_plan()
    assert plan == TargetPlan(layer=hp.layers[-1], loss_layer=hp.v_loss_layer, layer_module_tmp="model.layers.{}",
                              ln_f_module=hp.ln_f_module, lm_head_module=hp.lm_head_module,
                              fact_token=hp.fact_token, steps=hp.v_num_grad_steps, lr=0.25,
                              weight_decay=hp.v_weight_decay, kl_factor=0.125,
                              clamp_norm_factor=hp.clamp_norm_factor)
    assert (plan.layer_name, plan.loss_name) == (f"model.layers.{hp.layers[-1]}", f"model.layers.{hp.v_loss_layer}")


def test_plan_is_frozen():
    plan = llama3_plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lr = 1.0


@pytest.mark.parametrize("field, value, error", [
    ("layer", -1, ValueError), ("layer", 2.0, ValueError), ("loss_layer", 3, ValueError),
    ("steps", 0, ValueError), ("lr", 0.0, ValueError), ("lr", float("nan"), ValueError),
    ("weight_decay", -0.5, ValueError), ("kl_factor", "0.1", TypeError), ("clamp_norm_factor", -1.0, ValueError),
    ("fact_token", "first", ValueError), ("layer_module_tmp", "model.layers", ValueError),
    ("ln_f_module", None, TypeError),
])
def test_plan_rejects_a_bad_value_naming_the_field(field, value, error):
    with pytest.raises(error, match=f"TargetPlan.{field}"):
        dataclasses.replace(llama3_plan(), **{field: value})


@pytest.mark.usefixtures("one_thread")
def test_targets_run_the_plan():
    """A one-step plan only evaluates: no optimiser step, z is the unedited output."""
    tok = tiny_tokenizer(bos=True)
    model = tiny_model("llama", tok)
    plan = TargetPlan(layer=1, loss_layer=3, layer_module_tmp="model.layers.{}", ln_f_module="model.norm",
                      lm_head_module="lm_head", fact_token="subject_last", steps=1, lr=0.5, weight_decay=0.5,
                      kl_factor=0.0625, clamp_norm_factor=0.75)
    results = compute_targets(model, tok, subject_end_requests(tok, 2), plan, [["{}"]])
    assert [r.steps for r in results] == [0, 0]
    assert all(r.z.equal(r.init) and r.nll_after == r.nll_before for r in results)
    longer = compute_targets(model, tok, subject_end_requests(tok, 2), dataclasses.replace(plan, steps=3),
                             [["{}"]])
    assert all(r.steps == 2 and not r.z.equal(r.init) for r in longer)
