"""Editing hyperparameters in the public EasyEdit/AlphaEdit format.

EasyEdit's YAML files (and AlphaEdit's JSON files) load unchanged: their
bookkeeping keys (``alg_name``, ``model_name``, ``stats_dir``, ``P_loc``, ...)
are accepted and kept in :attr:`EditHparams.extra`, and numbers that YAML 1.1
reads as strings (``1e-1``, ``2e-2``) are converted. Any other unknown key is an
error naming it, so a typo never silently falls back to a default.

SPHERE adds two keys with the names of the official code:
``cumulative_ratio`` (eta) and ``suppression_strength`` (alpha).

Shipped settings live in ``sphere_fast/configs/<METHOD>/<model>.yaml`` and load
by name (``"SPHERE/llama3-8b"``); :func:`shipped_for_model` names the file for
a named model (``smollm2``). docs/editing.md says where they come from.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._validation import check_positive_int

# Keys of public hparam files that carry no meaning for the algorithms here.
BOOKKEEPING_KEYS = frozenset({
    "alg_name", "model_name", "stats_dir", "P_loc", "device", "layer_selection", "mom2_adjustment",
    "attn_module_tmp", "model_parallel", "max_length", "batch_size", "fp16", "use_chat_template",
    "sequential_edit", "context_template_length_params",
})
FACT_TOKENS = ("subject_last", "last")
FT_OBJECTIVES = ("prompt_last", "target_new")
UPDATE_ORDERS = ("after_layers", "per_layer")
MOM2_DTYPES = ("float32", "float64", "float16", "bfloat16")
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
# Named models (sphere_fast.harness.model_sources) with shipped settings: name -> file stem.
SHIPPED_MODELS = {"smollm2": "smollm2-135m"}
# The methods default_hparams knows (the registry, editing.methods.METHODS, imports this module).
METHOD_NAMES = ("memit", "alphaedit", "rect", "prune", "ft")


@dataclass
class EditHparams:
    """Algorithm settings for MEMIT, AlphaEdit, RECT, PRUNE and FT (+ SPHERE); names as in the public code."""

    layers: list[int]
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    v_loss_layer: int | None = None  # locate-then-edit methods only (FT files have none)
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    mom2_update_weight: float = 15000.0  # MEMIT only
    nullspace_threshold: float = 2e-2  # AlphaEdit only
    L2: float = 10.0  # AlphaEdit only
    lr: float = 5e-4  # FT only: Adam's learning rate
    num_steps: int = 25  # FT only
    norm_constraint: float | None = None  # FT only: L-infinity bound on the change; None (or false) for none
    weight_decay: float = 0.0  # FT only: Adam's weight decay
    objective_optimization: str = "prompt_last"  # FT only: FT-L ("prompt_last") or FT-M ("target_new")
    # Locate-then-edit methods only: "after_layers" (MEMIT's public code: each layer's raw update is seen by
    # the layers above, then every update is rectified/restrained and projected), "per_layer" (AlphaEdit's:
    # each layer's final update is applied before the next layer's keys); None -> the method's own.
    update_order: str | None = None
    cumulative_ratio: float | None = None  # SPHERE eta; None -> the Editor's default
    suppression_strength: float | None = None  # SPHERE alpha; None -> the Editor's default
    extra: dict = field(default_factory=dict)  # bookkeeping keys, kept for round trips

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["layers"] = list(self.layers)
        return {**self.extra, **out}

    def replace(self, **changes) -> "EditHparams":
        return load_hparams({**self.to_dict(), **changes})


_INT_FIELDS = ("v_loss_layer", "v_num_grad_steps", "mom2_n_samples", "num_steps")
_FLOAT_FIELDS = ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight",
                 "nullspace_threshold", "L2", "lr", "norm_constraint", "weight_decay", "cumulative_ratio",
                 "suppression_strength")
_STR_FIELDS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "ln_f_module", "lm_head_module",
               "fact_token", "mom2_dataset", "mom2_dtype", "objective_optimization")
FIELDS = tuple(f.name for f in dataclasses.fields(EditHparams) if f.name != "extra")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"hparam {name!r} must be a number, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads 1e-1 as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"hparam {name!r} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"hparam {name!r} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    number = _number(value, name)
    if number != int(number):
        raise ValueError(f"hparam {name!r} must be an integer, got {value!r}")
    return int(number)


def _check(hp: EditHparams) -> None:
    """Coerce numbers in place and reject values the algorithms cannot use."""
    if isinstance(hp.layers, (int, str)) or not hasattr(hp.layers, "__iter__"):
        raise ValueError(f"hparam 'layers' must be a list of layer indices, got {hp.layers!r}")
    hp.layers = [_integer(v, "layers") for v in hp.layers]
    if hp.norm_constraint is False:  # EasyEdit's FT files say "no constraint" so
        hp.norm_constraint = None
    if not hp.layers:
        raise ValueError("hparam 'layers' must not be empty")
    if any(v < 0 for v in hp.layers) or any(b <= a for a, b in zip(hp.layers, hp.layers[1:])):
        raise ValueError(f"hparam 'layers' must be distinct non-negative indices in ascending order, got {hp.layers}")
    for name in _INT_FIELDS:
        value = getattr(hp, name)
        if value is not None or name != "v_loss_layer":
            setattr(hp, name, _integer(value, name))
    for name in _FLOAT_FIELDS:
        value = getattr(hp, name)
        if value is not None:
            setattr(hp, name, _number(value, name))
    for name in _STR_FIELDS:
        if not isinstance(getattr(hp, name), str):
            raise ValueError(f"hparam {name!r} must be a string, got {getattr(hp, name)!r}")
    # EasyEdit's and the public SPHERE code's FT files name the parameter, the others the module.
    hp.rewrite_module_tmp = hp.rewrite_module_tmp.removesuffix(".weight")
    for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp"):
        if getattr(hp, name).count("{}") != 1:
            raise ValueError(f"hparam {name!r} must contain one '{{}}' for the layer index, got {getattr(hp, name)!r}")
    if hp.fact_token not in FACT_TOKENS:
        raise ValueError(f"hparam 'fact_token' must be one of {FACT_TOKENS}, got {hp.fact_token!r}")
    if hp.mom2_dtype not in MOM2_DTYPES:
        raise ValueError(f"hparam 'mom2_dtype' must be one of {MOM2_DTYPES}, got {hp.mom2_dtype!r}")
    if hp.update_order is not None and hp.update_order not in UPDATE_ORDERS:
        raise ValueError(f"hparam 'update_order' must be one of {UPDATE_ORDERS} or null, got {hp.update_order!r}")
    if hp.objective_optimization not in FT_OBJECTIVES:
        raise ValueError(f"hparam 'objective_optimization' must be one of {FT_OBJECTIVES}, "
                         f"got {hp.objective_optimization!r}")
    if hp.v_loss_layer is not None and hp.v_loss_layer < hp.layers[-1]:
        raise ValueError(f"hparam 'v_loss_layer' ({hp.v_loss_layer}) must be >= the last edited layer ({hp.layers[-1]})")
    for name in ("v_num_grad_steps", "mom2_n_samples", "num_steps"):
        check_positive_int(getattr(hp, name), f"hparam {name!r}")
    for name in ("v_lr", "clamp_norm_factor", "lr"):
        if getattr(hp, name) <= 0:
            raise ValueError(f"hparam {name!r} must be > 0, got {getattr(hp, name)}")
    for name in ("v_weight_decay", "kl_factor", "mom2_update_weight", "nullspace_threshold", "L2", "weight_decay"):
        if getattr(hp, name) < 0:
            raise ValueError(f"hparam {name!r} must be >= 0, got {getattr(hp, name)}")
    if hp.norm_constraint is not None and hp.norm_constraint <= 0:
        raise ValueError(f"hparam 'norm_constraint' must be > 0 (or null for none), got {hp.norm_constraint}")
    if hp.cumulative_ratio is not None and not 0 < hp.cumulative_ratio <= 1:
        raise ValueError(f"hparam 'cumulative_ratio' (SPHERE eta) must be in (0, 1], got {hp.cumulative_ratio}")
    if hp.suppression_strength is not None and not 0 <= hp.suppression_strength <= 1:
        raise ValueError(f"hparam 'suppression_strength' (SPHERE alpha) must be in [0, 1], got {hp.suppression_strength}")


def _read(source: str | Path) -> dict:
    path = Path(source)
    if not path.exists():
        try:
            path = shipped_hparams(str(source))
        except ValueError:
            raise FileNotFoundError(f"hparams file {str(source)!r} does not exist and is not a shipped name") from None
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"hparams file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def load_hparams(source: str | Path | dict, **overrides) -> EditHparams:
    """Hyperparameters from a YAML/JSON file, a shipped name ("AlphaEdit/llama3-8b") or a dict.

    ``overrides`` replace keys of the source. Unknown keys raise ValueError naming them.
    """
    data = dict(source) if isinstance(source, dict) else _read(source)
    data.update(overrides)
    extra = dict(data.pop("extra", None) or {})
    unknown = sorted(k for k in data if k not in FIELDS and k not in BOOKKEEPING_KEYS)
    if unknown:
        raise ValueError(f"unknown hparam key(s) {unknown}; known: {sorted(FIELDS)} and bookkeeping {sorted(BOOKKEEPING_KEYS)}")
    extra.update({k: data.pop(k) for k in list(data) if k in BOOKKEEPING_KEYS})
    required = [f.name for f in dataclasses.fields(EditHparams)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"missing hparam key(s) {missing}")
    return EditHparams(**data, extra=extra)


def shipped_hparams(name: str) -> Path:
    """Path of a shipped settings file, e.g. ``"AlphaEdit/llama3-8b"`` or ``"SPHERE/qwen2.5-7b"``."""
    stem = str(name).removesuffix(".yaml")
    available = sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.glob("*/*.yaml"))
    for candidate in available:
        if candidate.lower() == stem.lower():
            return CONFIGS_DIR / f"{candidate}.yaml"
    raise ValueError(f"no shipped hparams named {name!r}; available: {available}")


def shipped_for_model(model_name: str | None, method: str, *, sphere: bool) -> str | None:
    """The shipped settings for a named model and method (e.g. ``"SPHERE/smollm2-135m"``), or None.

    AlphaEdit + SPHERE takes the SPHERE file (AlphaEdit's settings with eta and
    alpha), AlphaEdit alone the AlphaEdit file, MEMIT, RECT and PRUNE (with or
    without SPHERE) the MEMIT file: the two edit with MEMIT's update; FT its own
    file. None when ``model_name`` has no shipped settings.
    """
    method = method.lower()
    if method not in METHOD_NAMES:
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}, got {method!r}")
    stem = SHIPPED_MODELS.get(model_name) if model_name is not None else None
    if stem is None:
        return None
    folder = {"alphaedit": "SPHERE" if sphere else "AlphaEdit", "ft": "FT"}.get(method, "MEMIT")
    name = f"{folder}/{stem}"
    shipped_hparams(name)  # raises if the file is missing from the package
    return name


def _family(model) -> str:
    from .model_utils import has_module

    if has_module(model, "model.layers.0.mlp.down_proj"):
        return "llama"  # Llama, Qwen2, Mistral
    if has_module(model, "transformer.h.0.mlp.c_proj"):
        return "gpt2"
    if has_module(model, "transformer.h.0.mlp.fc_out"):
        return "gptj"
    raise ValueError(
        f"default_hparams: unsupported architecture {type(model).__name__}: expected model.layers.N.mlp.down_proj "
        "(Llama/Qwen2/Mistral), transformer.h.N.mlp.c_proj (GPT-2) or transformer.h.N.mlp.fc_out (GPT-J)"
    )


_TEMPLATES = {
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  mlp_module_tmp="model.layers.{}.mlp", ln_f_module="model.norm", lm_head_module="lm_head"),
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                 mlp_module_tmp="transformer.h.{}.mlp", ln_f_module="transformer.ln_f", lm_head_module="lm_head"),
    "gptj": dict(rewrite_module_tmp="transformer.h.{}.mlp.fc_out", layer_module_tmp="transformer.h.{}",
                 mlp_module_tmp="transformer.h.{}.mlp", ln_f_module="transformer.ln_f", lm_head_module="lm_head"),
}


def default_hparams(model, method: str) -> EditHparams:
    """Settings derived from the architecture and size of ``model``.

    Large models (hidden >= 1024) get the public settings (five layers from
    4/32 of the depth for Llama-like models, 13/48 for GPT-2, 3/28 for GPT-J, mom2_update_weight 15000, L2 10 for Llama-like and
    GPT models, 1 for Qwen2, v_lr 0.1 Llama / 0.5 others). Small models get the
    settings that work on tiny random models (docs/editing.md): v_lr 0.5,
    mom2_update_weight 100, L2 0.01, few covariance samples. RECT and PRUNE
    take MEMIT's settings; FT edits one layer at 21/32 of the depth (the public
    Llama3-8B file) with its own lr, num_steps and no norm constraint.
    """
    method = str(method).lower()
    if method not in METHOD_NAMES:
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}; got {method!r}")
    family = _family(model)
    config = model.config
    n_layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    count = min(5, max(1, n_layers // 2))
    # Where the public files start: Llama3-8B 4/32, GPT-2 XL 13/48, GPT-J 3/28.
    first = {"llama": 4 / 32, "gpt2": 13 / 48, "gptj": 3 / 28}[family]
    start = min(max(1, round(n_layers * first)), n_layers - count)
    layers = list(range(start, start + count))
    if method == "ft":  # one layer, further up
        layers = [min(round(n_layers * 21 / 32), n_layers - 1)]
    large = hidden >= 1024
    qwen = getattr(config, "model_type", "") == "qwen2"
    data = dict(
        _TEMPLATES[family],
        layers=layers,
        v_loss_layer=n_layers - 1,
        fact_token="subject_last",
        v_num_grad_steps=20 if family == "gpt2" and large else 25,
        v_lr=0.1 if (large and family == "llama" and not qwen) else 0.5,
        v_weight_decay=1e-3 if (large and qwen) else 0.5,
        clamp_norm_factor=4.0 if (large and qwen) else 0.75,
        kl_factor=0.0625,
        mom2_dataset="wikitext",
        mom2_n_samples=100000 if large else 1000,
        mom2_dtype="float32",
        mom2_update_weight=(20000.0 if family == "gpt2" else 15000.0) if large else 100.0,
        nullspace_threshold=2e-2,
        L2=(1.0 if qwen else 10.0) if large else 0.01,
        alg_name={"memit": "MEMIT", "alphaedit": "AlphaEdit", "rect": "RECT", "prune": "PRUNE", "ft": "FT"}[method],
    )
    return load_hparams(data)
