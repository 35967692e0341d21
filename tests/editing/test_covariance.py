"""Key statistics C0 = E[k k^T]: value, corpus formats, and the disk cache (reuse and invalidation)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from sphere_fast.editing import covariance as cov
from sphere_fast.editing.model_utils import get_module, weights_fingerprint

from .fixtures import tiny_model, tiny_tokenizer

NAME = "model.layers.1.mlp.down_proj"
TEXTS = [
    "The Eiffel Tower is located in Paris .",
    "Danielle Darrieux was a French actress and singer , born in Bordeaux .",
    "Toyota is a car maker whose headquarters are in Japan .",
    "The official religion of Edwin of Northumbria is Christianity .",
    "A river flows through the old town .",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    return tok, tiny_model("llama", tok)


# As WikiText stores them: a leading space, a heading, blank lines of spaces; a byte order mark first.
LINES = [" = Heading = \n", *(" " + t + "\n" for t in TEXTS)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\ufeff" + " \n" + LINES[0] + " \n\t\n" + "".join(LINES[1:]) + "\n", encoding="utf-8")
    return path


def explicit_c0(model, tok, texts, max_length, name=NAME):
    """Mean of k k^T over every token, one text at a time through the whole model (no padding, no early stop)."""
    total, count = 0, 0
    keys = []
    hook = get_module(model, name).register_forward_hook(lambda m, a, o: keys.append(a[0][0].double()))
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


def assert_c0_close(got, expected):
    # fp32 keys and fp32 products per batch (summed in float64): padded batches round differently.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_read_corpus_keeps_raw_lines(corpus):
    """Lines stay as the public code reads WikiText rows: leading space, heading and newline kept."""
    assert cov.read_corpus(corpus, 100) == LINES
    assert cov.read_corpus(corpus, 2) == LINES[:2]


def test_c0_is_mean_second_moment(setup, corpus, tmp_path):
    tok, model = setup
    other = "model.layers.0.mlp.down_proj"
    # A small token budget: several length-sorted batches, most of them padded.
    with pytest.warns(UserWarning, match=f"holds {len(LINES)} texts, fewer than mom2_n_samples=100"):
        c0s, keys = cov.layer_second_moments(model, tok, [NAME, other], corpus=corpus, n_samples=100,
                                             dtype="float64", cache_dir=tmp_path / "cache", max_length=12,
                                             batch_tokens=30, progress=False)
    assert_c0_close(c0s[NAME], explicit_c0(model, tok, LINES, 12))
    assert_c0_close(c0s[other], explicit_c0(model, tok, LINES, 12, other))
    assert c0s[NAME].shape == (512, 512) and c0s[NAME].dtype == torch.float64
    assert len(keys[NAME]) == 32


def test_forward_stops_at_the_last_needed_module(setup):
    """Nothing after the last edited module's input runs: no later layer, no final norm, no LM head."""
    tok, model = setup
    ran = []
    later = ["model.layers.1.mlp.down_proj", "model.layers.2", "model.layers.3", "model.norm", "lm_head"]
    hooks = [get_module(model, name).register_forward_hook(lambda *a, name=name: ran.append(name)) for name in later]
    try:
        c0 = cov.compute_second_moments(model, tok, [NAME], LINES, max_length=16, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert ran == []
    assert_c0_close(c0[NAME], explicit_c0(model, tok, LINES, 16))


def test_length_batches_cover_every_text_within_the_budget():
    lengths = [5, 17, 3, 40, 9, 9, 1, 12, 33, 2]
    batches = cov.length_batches(lengths, 36)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths, reverse=True)
        assert len(batch) * widths[0] <= 36 or len(batch) == 1  # a text over the budget runs alone
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    with pytest.raises(ValueError, match="batch_tokens"):
        cov.compute_second_moments(None, None, [NAME], ["x"], max_length=4, batch_tokens=0)


def test_n_samples_and_jsonl(setup, tmp_path):
    tok, model = setup
    path = tmp_path / "corpus.jsonl"
    texts = [" " + t for t in TEXTS]
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["  ", *texts])) + "\n")
    assert cov.read_corpus(path, 3) == texts[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough texts: no warning
        c0s, _ = cov.layer_second_moments(model, tok, [NAME], corpus=path, n_samples=3, dtype="float64",
                                          cache_dir=tmp_path / "c", max_length=64, progress=False)
    assert_c0_close(c0s[NAME], explicit_c0(model, tok, texts[:3], 64))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match="line 1"):
        cov.read_corpus(bad, 5)
    bad.write_text('{"text": 5}\n')
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

    # So is the definition of the statistics: caches from an earlier definition are not reused.
    cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
    assert len(calls) == 5
    monkeypatch.setattr(cov, "STATS_DEFINITION", cov.STATS_DEFINITION + "-changed")
    cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
    assert len(calls) == 6
    monkeypatch.undo()
    monkeypatch.setattr(cov, "compute_second_moments", counting)

    # A corrupt cache file is recomputed, never trusted.
    for f in (tmp_path / "cache" / "stats").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    cov.layer_second_moments(model, tok, [NAME], n_samples=4, **kw)
    assert len(calls) == 7
