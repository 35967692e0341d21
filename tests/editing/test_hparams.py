"""Hyperparameters: public EasyEdit/AlphaEdit files load unchanged; bad keys and values are named."""
from __future__ import annotations

import json

import pytest

from sphere_fast.editing.hparams import (
    CONFIGS_DIR,
    EditHparams,
    default_hparams,
    load_hparams,
    shipped_for_model,
    shipped_hparams,
)

from .fixtures import tiny_model, tiny_tokenizer

# EasyEdit's hparams/AlphaEdit/llama3-8b.yaml, as published (comments, bookkeeping keys, 1e-1 / 2e-2).
EASYEDIT_ALPHAEDIT_LLAMA3 = """\
alg_name: "AlphaEdit"
model_name: "./hugging_cache/llama-3-8b"
stats_dir: "./data/stats"
# Make sure that the projection matrix P has been downloaded beforehand.
P_loc: "./null_space_project.pt"
device: 0
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 1e-1
v_loss_layer: 31
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
nullspace_threshold: 2e-2
L2: 10
"""

# EasyEdit's hparams/MEMIT/qwen2.5-7b.yaml layout (model_parallel, v_weight_decay 1e-3).
EASYEDIT_MEMIT_QWEN = """\
alg_name: "MEMIT"
model_name: "Qwen/Qwen2.5-7B"
stats_dir: "./data/stats"
device: 5
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 27
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: False
"""


def test_easyedit_yaml_loads_unchanged(tmp_path):
    path = tmp_path / "llama3-8b.yaml"
    path.write_text(EASYEDIT_ALPHAEDIT_LLAMA3)
    hp = load_hparams(path)
    assert hp.layers == [4, 5, 6, 7, 8]
    assert hp.v_lr == pytest.approx(0.1) and isinstance(hp.v_lr, float)  # YAML 1.1 gave the string "1e-1"
    assert hp.nullspace_threshold == pytest.approx(0.02)
    assert hp.L2 == 10.0 and hp.mom2_update_weight == 15000.0
    assert hp.v_loss_layer == 31 and hp.v_num_grad_steps == 25 and hp.mom2_n_samples == 100000
    assert hp.extra["alg_name"] == "AlphaEdit" and hp.extra["P_loc"] == "./null_space_project.pt"
    assert hp.cumulative_ratio is None and hp.suppression_strength is None
    q = tmp_path / "qwen.yaml"
    q.write_text(EASYEDIT_MEMIT_QWEN)
    hq = load_hparams(q)
    assert hq.v_weight_decay == pytest.approx(1e-3) and hq.clamp_norm_factor == 4.0 and hq.extra["model_parallel"] is False


def test_alphaedit_json_and_overrides(tmp_path):
    data = load_hparams(shipped_hparams("AlphaEdit/llama3-8b")).to_dict()
    path = tmp_path / "Llama3-8B.json"
    path.write_text(json.dumps(data))
    hp = load_hparams(path, L2=0.5, cumulative_ratio="5e-1")
    assert hp.L2 == 0.5 and hp.cumulative_ratio == 0.5 and hp.layers == [4, 5, 6, 7, 8]


@pytest.mark.parametrize("alg", ["MEMIT", "AlphaEdit", "SPHERE"])
@pytest.mark.parametrize("model", ["llama3-8b", "qwen2.5-7b", "gpt2-xl"])
def test_shipped_files(alg, model):
    hp = load_hparams(shipped_hparams(f"{alg}/{model}"))
    assert hp.extra["alg_name"] == alg
    assert hp.layers == ([13, 14, 15, 16, 17] if model == "gpt2-xl" else [4, 5, 6, 7, 8])
    assert hp.v_lr == {"llama3-8b": 0.1, "qwen2.5-7b": 0.5, "gpt2-xl": 0.5}[model]
    if alg == "SPHERE":
        assert (hp.cumulative_ratio, hp.suppression_strength) == (0.5, 0.5)
    if model == "gpt2-xl":
        assert hp.rewrite_module_tmp == "transformer.h.{}.mlp.c_proj"


def test_shipped_name_errors():
    with pytest.raises(ValueError, match="available"):
        shipped_hparams("AlphaEdit/llama9")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_hparams("nope.yaml")


@pytest.mark.parametrize("method,sphere,expected", [
    ("alphaedit", True, "SPHERE/smollm2-135m"), ("alphaedit", False, "AlphaEdit/smollm2-135m"),
    ("memit", True, "MEMIT/smollm2-135m"), ("MEMIT", False, "MEMIT/smollm2-135m"),
])
def test_shipped_for_model(method, sphere, expected):
    assert shipped_for_model("smollm2", method, sphere=sphere) == expected
    assert shipped_hparams(expected) == CONFIGS_DIR / f"{expected}.yaml"
    assert shipped_for_model("llama3-8b", method, sphere=sphere) is None  # a file stem, not a named model
    assert shipped_for_model(None, method, sphere=sphere) is None
    with pytest.raises(ValueError, match="method must be one of memit, alphaedit, rect, prune, ft, got 'rome'"):
        shipped_for_model("smollm2", "rome", sphere=sphere)


def test_shipped_files_are_in_the_configs_folder():
    assert CONFIGS_DIR.name == "configs" and CONFIGS_DIR.parent.name == "sphere_fast"
    assert shipped_hparams("sphere/SMOLLM2-135M.yaml") == CONFIGS_DIR / "SPHERE" / "smollm2-135m.yaml"


def _base() -> dict:
    return load_hparams(shipped_hparams("AlphaEdit/llama3-8b")).to_dict()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"v_lrr": 0.1}, "v_lrr"),
        ({"v_lr": "fast"}, "v_lr"),
        ({"v_lr": -1.0}, "v_lr"),
        ({"layers": [5, 4]}, "layers"),
        ({"layers": []}, "layers"),
        ({"v_num_grad_steps": 2.5}, "v_num_grad_steps"),
        ({"fact_token": "subject_first_after_last"}, "fact_token"),
        ({"mom2_dtype": "int8"}, "mom2_dtype"),
        ({"rewrite_module_tmp": "model.layers.mlp"}, "rewrite_module_tmp"),
        ({"v_loss_layer": 3}, "v_loss_layer"),
        ({"cumulative_ratio": 1.5}, "cumulative_ratio"),
        ({"suppression_strength": -0.1}, "suppression_strength"),
        ({"L2": True}, "L2"),
        ({"update_order": "sideways"}, "update_order"),
    ],
)
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        load_hparams({**_base(), **change})


def test_missing_key_named():
    data = _base()
    del data["rewrite_module_tmp"]
    with pytest.raises(ValueError, match="rewrite_module_tmp"):
        load_hparams(data)


@pytest.mark.parametrize(
    "arch, rewrite, conv",
    [
        ("llama", "model.layers.{}.mlp.down_proj", False),
        ("qwen2", "model.layers.{}.mlp.down_proj", False),
        ("mistral", "model.layers.{}.mlp.down_proj", False),
        ("gpt2", "transformer.h.{}.mlp.c_proj", True),
        ("gptj", "transformer.h.{}.mlp.fc_out", False),
    ],
)
def test_default_hparams_templates(arch, rewrite, conv):
    from sphere_fast.editing.model_utils import get_module, is_conv1d, oriented_weight

    model = tiny_model(arch, tiny_tokenizer())
    hp = default_hparams(model, "alphaedit")
    assert isinstance(hp, EditHparams)
    assert hp.rewrite_module_tmp == rewrite
    assert hp.layers == [1, 2] and hp.v_loss_layer == 3  # 4-layer model
    module = get_module(model, rewrite.format(1))
    assert is_conv1d(module) == conv
    assert tuple(oriented_weight(module).shape) == (128, 512)  # [out=hidden, in=intermediate]
    for tmpl in (hp.layer_module_tmp, hp.mlp_module_tmp):
        get_module(model, tmpl.format(hp.layers[-1]))
    get_module(model, hp.ln_f_module)
    get_module(model, hp.lm_head_module)


def test_default_hparams_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        default_hparams(tiny_model("llama", tiny_tokenizer()), "rome")


@pytest.mark.parametrize(
    "config, expected",
    [
        ("llama", dict(layers=[4, 5, 6, 7, 8], v_loss_layer=31, v_lr=0.1, L2=10.0, mom2_update_weight=15000.0)),
        ("qwen2", dict(layers=[4, 5, 6, 7, 8], v_loss_layer=27, v_lr=0.5, L2=1.0, clamp_norm_factor=4.0,
                       v_weight_decay=1e-3)),
        ("gpt2", dict(layers=[13, 14, 15, 16, 17], v_loss_layer=47, v_lr=0.5, v_num_grad_steps=20,
                      mom2_update_weight=20000.0)),
    ],
)
def test_default_hparams_match_public_files_at_full_size(config, expected):
    """Llama3-8B, Qwen2.5-7B and GPT-2 XL shapes (built on the meta device: no memory, no weights)."""
    import torch
    import transformers as tf

    cfg = {
        "llama": lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
        "gpt2": lambda: tf.GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    }[config]()
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    hp = default_hparams(model, "alphaedit")
    for key, value in expected.items():
        assert getattr(hp, key) == pytest.approx(value), key


def test_every_method_has_its_shipped_settings_or_none():
    from sphere_fast.cli import METHOD_NAMES as CLI_METHOD_NAMES  # a copy: the parser imports no torch
    from sphere_fast.editing.hparams import METHOD_NAMES
    from sphere_fast.editing.methods import METHODS

    assert METHOD_NAMES == CLI_METHOD_NAMES == tuple(METHODS)
    for method in ("rect", "prune"):  # MEMIT's update, then their restraint: MEMIT's settings
        for sphere in (False, True):
            assert shipped_for_model("smollm2", method, sphere=sphere) == "MEMIT/smollm2-135m"
    for sphere in (False, True):  # FT has its own file, chosen on the train split
        assert shipped_for_model("smollm2", "ft", sphere=sphere) == "FT/smollm2-135m"
