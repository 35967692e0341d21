"""The editing methods as strategies: the registry, and RECT against a float64 transcription of
its formula (small matrices) and on tiny models through the Editor."""
from __future__ import annotations

import pytest
import torch

from sphere_fast.editing.editor import Editor
from sphere_fast.editing.hparams import METHOD_NAMES, default_hparams
from sphere_fast.editing.methods import METHODS, method_class
from sphere_fast.editing.rect import RECT, rect_mask

from .fixtures import subject_end_requests, tiny_model, tiny_tokenizer

FAST = {"mom2_n_samples": 64, "v_num_grad_steps": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(bos=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


def make_editor(model, tok, cache, method, *, sphere=False, **hp):
    hparams = default_hparams(model, method).replace(**{**FAST, **hp})
    return Editor(model, tok, hparams, method=method, sphere=sphere, cache_dir=cache, progress=False)


# -- registry ----------------------------------------------------------------------------------------


def test_registry_rejects_an_unknown_name_listing_the_known_ones(tok):
    assert list(METHODS) == ["memit", "alphaedit", "rect"]
    assert set(METHODS) <= set(METHOD_NAMES)  # default_hparams knows every registered method
    assert method_class("RECT") is RECT
    for call in (lambda: method_class("rome"),
                 lambda: Editor(tiny_model("llama", tok), tok, default_hparams(tiny_model("llama", tok), "memit"),
                                method="rome")):
        with pytest.raises(ValueError, match="memit, alphaedit, rect; got 'rome'"):
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
    delta = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.rand(shape, generator=gen, dtype=torch.float64)
    mask = rect_mask(delta, W)
    assert torch.equal(mask, rect_mask_float64(delta, W))
    n = delta.numel()
    assert int(mask.sum()) == n - int(n * 60 / 100) + 1  # no ties in random data: 40 % (+1, the threshold itself)
    kept = RECT(None).before_projection("w", W, delta)
    assert torch.equal(kept, torch.where(mask, delta, 0.0))


def test_rect_edits_only_the_masked_entries(tok, cache):
    """Without SPHERE, each layer's weight changes in exactly 40 % (+1) of its entries."""
    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, cache, "rect")
    before = {n: w.clone() for n, w in ed.edited_weights().items()}
    info = ed.edit_batch(subject_end_requests(tok, 3))
    for n, w in ed.edited_weights().items():
        changed = int((w != before[n]).sum())
        assert 0 < changed <= w.numel() - int(w.numel() * 60 / 100) + 1, n
        assert info["layers"][n]["update_norm"] > 0
