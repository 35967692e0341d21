"""train-lm: determinism, a loadable Hugging Face directory, cache reuse (tiny config, few steps)."""
from __future__ import annotations

import json

import pytest
import torch


from sphere_fast.editing import paths
from sphere_fast.harness import train_lm
from sphere_fast.harness.train_lm import PRESETS, TrainConfig, detokenize, ensure_model, train

TINY = PRESETS["tiny"].replace(steps=12)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _need_wikitext():
    if not paths.wikitext_path("test").exists():
        pytest.skip(f"WikiText-2 not present under {paths.data_dir()} (set SPHERE_FAST_DATA_DIR)")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def trained_a(tmp_path_factory):
    if not paths.wikitext_path("test").exists():
        pytest.skip(f"WikiText-2 not present under {paths.data_dir()} (set SPHERE_FAST_DATA_DIR)")
    path = tmp_path_factory.mktemp("lm") / "a"
    return path, train(TINY, path, device="cpu", progress=False)


def test_same_seed_same_model_and_round_trip(tmp_path, trained_a):
    path_a, info_a = trained_a
    info_b = train(TINY, tmp_path / "b", device="cpu", progress=False)
    wa, wb = _weights(path_a), _weights(tmp_path / "b")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert info_a["heldout_perplexity"] == info_b["heldout_perplexity"]
    assert (path_a / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    # Training did something: the loss went down from about ln(vocab).
    curve = info_a["loss_curve"]
    assert curve[0] > curve[-1]
    assert curve[0] == pytest.approx(torch.log(torch.tensor(float(TINY.vocab_size))).item(), rel=0.15)

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path_a)
    tok = AutoTokenizer.from_pretrained(path_a)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == TINY.hidden_size and model.config.num_hidden_layers == TINY.num_layers
    assert len(tok) == model.config.vocab_size == TINY.vocab_size
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], wa[k]) for k in wa)
    text = "The mother tongue of Danielle Darrieux is English."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round trip, no BOS added
    assert tok.eos_token == train_lm.EOS and tok.pad_token_id == tok.eos_token_id
    # The saved perplexity is the loaded model's perplexity on the held-out text.
    docs = train_lm.articles(train_lm.data_files())
    _, held = train_lm.split_articles(docs, TINY.heldout_fraction, TINY.max_chars)
    ppl = train_lm.perplexity(model, train_lm.token_stream(tok, held), TINY.seq_len)
    assert ppl == pytest.approx(info_a["heldout_perplexity"], rel=1e-4)


def test_seed_changes_weights(tmp_path, trained_a):
    train(TINY.replace(seed=1), tmp_path / "b", device="cpu", progress=False)
    wa, wb = _weights(trained_a[0]), _weights(tmp_path / "b")
    assert not torch.equal(wa["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])


def test_cache_reuse(cache):
    path, info, reused = ensure_model(TINY, device="cpu", progress=False)
    assert not reused and path.parent == cache / "models"
    assert json.loads((path / "train_info.json").read_text())["config"]["seed"] == TINY.seed
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again, info2, reused2 = ensure_model(TINY, device="cpu", progress=False)
    assert reused2 and again == path and info2 == info
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    # Another config is another key; no stray temporary folders remain.
    assert train_lm.model_dir(TINY.replace(steps=13), "cpu") != path
    assert [p.name for p in (cache / "models").iterdir()] == [path.name]
    forced, _, reused3 = ensure_model(TINY, device="cpu", progress=False, force=True)
    assert forced == path and not reused3 and (path / "model.safetensors").stat().st_mtime_ns != stamp


def test_config_validation_and_text():
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_heads"):
        TrainConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    assert detokenize(" The cross @-@ country race , 1 @,@ 000 m , took 3 @.@ 5 years . ") == \
        "The cross-country race, 1,000 m, took 3.5 years."
    docs = train_lm.articles(train_lm.data_files())
    assert docs[0].startswith("Robert <unk>\n")
    assert not any(line.startswith("=") for doc in docs[:3] for line in doc.splitlines())
    train_docs, held = train_lm.split_articles(docs, 0.05, None)
    assert len(held) == round(0.05 * len(docs)) and train_docs + held == docs


def test_fact_documents_and_cache_key():
    if not paths.counterfact_path().exists():
        pytest.skip(f"CounterFact not present under {paths.data_dir()}")
    docs = train_lm.fact_documents(paths.counterfact_path(), 3, 2, seed=0)
    sentences = [s.strip() + "." for d in docs for s in d.split(".") if s.strip()]
    assert len(sentences) == 3 * 2 * 2
    assert sentences.count("The mother tongue of Danielle Darrieux is French.") == 2
    assert sentences.count("Michel Rocard is a native speaker of French.") == 2
    assert not any("Where Danielle Darrieux is from" in s for s in sentences)  # rephrasings stay unseen
    assert docs == train_lm.fact_documents(paths.counterfact_path(), 3, 2, seed=0)
    with_facts = TINY.replace(fact_records=3)
    assert train_lm.data_files(with_facts)[-1] == paths.counterfact_path()
    assert train_lm.cache_key(with_facts, "cpu") != train_lm.cache_key(TINY, "cpu")
    train_docs, held, _ = train_lm.training_text(with_facts)
    facts = train_lm.fact_documents(paths.counterfact_path(), 3, with_facts.fact_repeats, seed=with_facts.seed)
    assert train_docs[-len(facts):] == facts and held == train_lm.training_text(TINY)[1]
