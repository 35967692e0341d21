"""FT's two objectives against float64 transcriptions, and the public FT settings files loading unchanged."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sphere_fast.editing.compute import fill, target_ids
from sphere_fast.editing.editor import Editor
from sphere_fast.editing.ft import prompt_last_nlls, target_nlls
from sphere_fast.editing.hparams import default_hparams, load_hparams

from .fixtures import subject_end_requests, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _requests_with_multi_token_targets(tok, n):
    # two target tokens each, so the mean over tokens is exercised
    return [dataclasses.replace(r, target_new=r.target_new + " city") for r in subject_end_requests(tok, n)]


@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_ft_objective_matches_float64(tok, objective):
    model = tiny_model("llama", tok).double()
    reqs = _requests_with_multi_token_targets(tok, 3)
    nlls = {"prompt_last": prompt_last_nlls, "target_new": target_nlls}[objective]
    with torch.no_grad():
        batched = nlls(model, tok, reqs)
        for i, r in enumerate(reqs):
            prompt = tok(fill(r.prompt, r.subject)[0])["input_ids"]
            target = target_ids(tok, r.target_new)
            assert len(target) >= 2
            if objective == "prompt_last":
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], dim=-1)
                expected = -logp[target].mean()
            else:
                logits = model(input_ids=torch.tensor([prompt + target])).logits[0]
                logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
                expected = -logp.gather(1, torch.tensor(target)[:, None]).mean()
            alone = nlls(model, tok, [r])[0]
            assert alone.dtype == torch.float64
            assert torch.allclose(alone, expected, rtol=1e-12, atol=0), (i, float(alone), float(expected))
            # In a right-padded batch: the same position and tokens (eager attention's padding moves fp64 logits ~1e-8).
            assert torch.allclose(batched[i], expected, rtol=1e-7, atol=0), (i, float(batched[i]), float(expected))


def test_ft_prompt_last_lowers_its_loss_and_reports_teacher_forced_nlls(tok, stats_cache):
    model = tiny_model("llama", tok)
    reqs = subject_end_requests(tok, 3)
    hp = default_hparams(model, "ft").replace(lr=1e-2, num_steps=10)
    assert hp.objective_optimization == "prompt_last"  # the public code's FT-L
    ed = Editor(model, tok, hp, method="ft", sphere=False, cache_dir=stats_cache, progress=False)
    info = ed.edit_batch(reqs)
    assert info["ft_losses"][-1] < info["ft_losses"][0]
    with torch.no_grad():
        assert torch.allclose(target_nlls(model, tok, reqs), torch.tensor(info["target_nll_after"]))


def test_public_ft_settings_file_loads_unchanged(tmp_path):
    """The public SPHERE code's FT JSON: parameter names, no v_loss_layer, weight_decay, kl_factor 0."""
    public = {"model_name": "Llama3-8B", "layers": [21], "num_steps": 25, "lr": 5e-4, "weight_decay": 0,
              "kl_factor": 0, "norm_constraint": False,
              "rewrite_module_tmp": "model.layers.{}.mlp.down_proj.weight", "layer_module_tmp": "model.layers.{}",
              "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
              "ln_f_module": "model.norm", "lm_head_module": "lm_head"}
    path = tmp_path / "Llama3-8B.json"
    path.write_text(json.dumps(public))
    hp = load_hparams(path)
    assert hp.rewrite_module_tmp == "model.layers.{}.mlp.down_proj"
    assert hp.v_loss_layer is None and hp.norm_constraint is None and hp.weight_decay == 0.0
    assert hp.objective_optimization == "prompt_last" and hp.layers == [21] and hp.lr == 5e-4
    shipped = load_hparams("FT/llama3-8b")
    for name in ("layers", "num_steps", "lr", "weight_decay", "norm_constraint", "rewrite_module_tmp",
                 "objective_optimization"):
        assert getattr(shipped, name) == getattr(hp, name), name
    assert load_hparams("FT/qwen2.5-7b").layers == [27]


@pytest.mark.parametrize("method", ["RECT", "PRUNE"])
@pytest.mark.parametrize("model", ["llama3-8b", "qwen2.5-7b"])
def test_rect_and_prune_files_take_memit_settings(method, model):
    memit, other = load_hparams(f"MEMIT/{model}").to_dict(), load_hparams(f"{method}/{model}").to_dict()
    assert other.pop("alg_name") == method and memit.pop("alg_name") == "MEMIT"
    assert (other.pop("cumulative_ratio"), other.pop("suppression_strength")) == (0.5, 0.8)  # paper App. D.4.1
    memit.pop("cumulative_ratio"), memit.pop("suppression_strength")
    assert other == memit


def test_bad_ft_settings_name_the_field(tok, tmp_path):
    model = tiny_model("llama", tok)
    hp = default_hparams(model, "ft")
    with pytest.raises(ValueError, match="objective_optimization"):
        hp.replace(objective_optimization="prompt_first")
    with pytest.raises(ValueError, match="weight_decay"):
        hp.replace(weight_decay=-1)
    memit = default_hparams(model, "memit").replace(v_loss_layer=None)
    with pytest.raises(ValueError, match="'v_loss_layer' is required for memit"):
        Editor(model, tok, memit, method="memit", cache_dir=tmp_path, progress=False)
    Editor(model, tok, hp.replace(v_loss_layer=None), method="ft", cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_ft_steps_run_on_the_recorded_lower_layers_exactly(tok, objective):
    """Stand-ins for the layers below the edited one (their output recorded once) give the same losses and
    gradients as whole forwards, so each FT step runs only the layers from the edited one up."""
    from sphere_fast.editing.ft import _inputs, _nlls, frozen_lower_layers

    model = tiny_model("llama", tok)
    hp = default_hparams(model, "ft")
    assert hp.layers == [3]  # three layers below stand in
    reqs = _requests_with_multi_token_targets(tok, 3)
    inputs = _inputs(model, tok, reqs, objective)
    weight = model.get_parameter("model.layers.3.mlp.down_proj.weight")
    weight.requires_grad_(True)
    ran = []
    hooks = [model.model.layers[i].mlp.register_forward_hook(lambda *a, i=i: ran.append(i)) for i in range(4)]
    try:
        whole = _nlls(model, inputs)
        (g_whole,) = torch.autograd.grad(whole.sum(), weight)
        ran.clear()
        with frozen_lower_layers(model, hp.layer_module_tmp, 3, inputs):
            ran.clear()
            fast = _nlls(model, inputs)
            (g_fast,) = torch.autograd.grad(fast.sum(), weight)
        assert ran == [3]
        assert torch.equal(whole, fast) and torch.equal(g_whole, g_fast)
        ran.clear()
        _nlls(model, inputs)
        assert ran == [0, 1, 2, 3]  # the real layers are back
    finally:
        for h in hooks:
            h.remove()
