"""Key statistics C0 = E[k k^T]: value, corpus formats, and the disk cache (reuse and invalidation)."""
from __future__ import annotations

import json

import pytest
import torch

from sphere_fast.editing import covariance as cov
from sphere_fast.editing.model_utils import get_module, weights_fingerprint

from .editing_fixtures import one_thread, tiny_model, tiny_tokenizer

NAME = "model.layers.1.mlp.down_proj"
TEXTS = [
    "The Eiffel Tower is located in Paris .",
    "Danielle Darrieux was a French actress and singer , born in Bordeaux .",
    "Toyota is a car maker whose headquarters are in Japan .",
    "The official religion of Edwin of Northumbria is Christianity .",
    "A river flows through the old town .",
]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    return tok, tiny_model("llama", tok)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(["", " = Heading = ", *TEXTS, ""]))
    return path


def explicit_c0(model, tok, texts, max_length):
    """Mean of k k^T over every token, one text at a time (no padding involved)."""
    total, count = 0, 0
    keys = []
    hook = get_module(model, NAME).register_forward_hook(lambda m, a, o: keys.append(a[0][0].double()))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
                model(input_ids=ids)
    finally:
        hook.remove()
    for k in keys:
        total = total + k.T @ k
        count += k.shape[0]
    return total / count


def test_c0_is_mean_second_moment(setup, corpus, tmp_path):
    tok, model = setup
    c0s, keys = cov.layer_second_moments(model, tok, [NAME], corpus=corpus, n_samples=100, dtype="float64",
                                         cache_dir=tmp_path / "cache", max_length=12, batch_size=2, progress=False)
    expected = explicit_c0(model, tok, TEXTS, 12)
    # Keys are fp32 activations; padded batches round differently from single texts.
    torch.testing.assert_close(c0s[NAME], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert c0s[NAME].shape == (512, 512) and c0s[NAME].dtype == torch.float64
    assert len(keys[NAME]) == 32


def test_n_samples_and_jsonl(setup, tmp_path):
    tok, model = setup
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
    assert cov.read_corpus(path, 3) == TEXTS[:3]
    c0s, _ = cov.layer_second_moments(model, tok, [NAME], corpus=path, n_samples=3, dtype="float64",
                                      cache_dir=tmp_path / "c", max_length=64, progress=False)
    expected = explicit_c0(model, tok, TEXTS[:3], 64)
    torch.testing.assert_close(c0s[NAME], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match="line 1"):
        cov.read_corpus(bad, 5)
    with pytest.raises(FileNotFoundError, match="stats_corpus"):
        cov.read_corpus(tmp_path / "missing.txt", 5)


def test_cache_reused_and_invalidated(setup, corpus, tmp_path, monkeypatch):
    tok, model = setup
    calls = []
    real = cov.compute_second_moments

    def counting(*args, **kwargs):
        calls.append(list(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(cov, "compute_second_moments", counting)
    kw = dict(corpus=corpus, dtype="float32", cache_dir=tmp_path / "cache", max_length=16, progress=False)
    first, k1 = cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
    again, k2 = cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
    assert len(calls) == 1 and k1 == k2
    assert torch.equal(first[NAME], again[NAME])

    cov.layer_second_moments(model, tok, [NAME], n_samples=5, **kw)  # sample count is in the key
    assert len(calls) == 2

    other = tiny_model("llama", tok, seed=1)  # same config and empty name_or_path, other weights
    assert weights_fingerprint(other) != weights_fingerprint(model)
    c_other, k3 = cov.layer_second_moments(other, tok, [NAME], n_samples=4, **kw)
    assert len(calls) == 3 and k3[NAME] != k1[NAME]
    assert not torch.equal(c_other[NAME], first[NAME])

    with torch.no_grad():  # an edit of one weight changes the key too
        get_module(model, "model.layers.0.mlp.down_proj").weight[0, 0] += 1e-3
    try:
        cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
        assert len(calls) == 4
    finally:
        with torch.no_grad():
            get_module(model, "model.layers.0.mlp.down_proj").weight[0, 0] -= 1e-3

    corpus.write_text("\n".join(TEXTS[::-1]))  # corpus content is in the key
    cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
    assert len(calls) == 5

    # A corrupt cache file is recomputed, never trusted.
    for f in (tmp_path / "cache" / "stats").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
    assert len(calls) == 6
