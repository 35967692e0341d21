"""``sphere-fast edit`` end to end on a tiny saved model; resume; argument errors; --model as a GGUF file;
--save-model; train-lm and demo wiring."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from sphere_fast.cli import main
from sphere_fast.editing import paths
from sphere_fast.harness.report import read_csv

pytestmark = pytest.mark.usefixtures("one_thread")

# Only the tests that read CounterFact or WikiText-2 (through ``env`` or directly) skip without them.
DATA_MISSING = None if paths.counterfact_path().exists() and paths.wikitext_path("test").exists() else (
    f"CounterFact / WikiText-2 not present under {paths.data_dir()} (set SPHERE_FAST_DATA_DIR)")
needs_data = pytest.mark.skipif(DATA_MISSING is not None, reason=str(DATA_MISSING))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny Llama + tokenizer, fast hparams, and a private cache directory."""
    if DATA_MISSING:
        pytest.skip(DATA_MISSING)
    from sphere_fast.editing.hparams import default_hparams
    from tests.editing.fixtures import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    old = os.environ.get("SPHERE_FAST_CACHE_DIR")
    os.environ["SPHERE_FAST_CACHE_DIR"] = str(root / "cache")
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, hidden=64, intermediate=128, layers=4, heads=2, seed=0)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    hp = default_hparams(model, "alphaedit").to_dict()
    hp.update(v_num_grad_steps=4, mom2_n_samples=60)
    hp_path = root / "hparams.yaml"
    hp_path.write_text(yaml.safe_dump(hp))
    yield {"root": root, "model": str(model_dir), "hparams": str(hp_path), "data": str(paths.counterfact_path())}
    if old is None:
        os.environ.pop("SPHERE_FAST_CACHE_DIR", None)
    else:
        os.environ["SPHERE_FAST_CACHE_DIR"] = old


def _args(env, out, *extra, edits="4", batch="2"):
    return ["edit", "--model", env["model"], "--data", env["data"], "--method", "alphaedit", "--edits", edits,
            "--batch-size", batch, "--hparams", env["hparams"], "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def full_run(env):
    out = env["root"] / "full"
    assert main(_args(env, out)) == 0
    return out


def test_edit_writes_json_csv_png(full_run, capsys):
    out = full_run
    rows = read_csv(out / "edits.csv")
    assert [r["batch"] for r in rows] == [0, 1, 2]
    assert [r["edits"] for r in rows] == [0, 2, 4]
    energy_cols = sorted(k for k in rows[0] if k.startswith("energy:"))
    assert energy_cols == ["energy:model.layers.1.mlp.down_proj", "energy:model.layers.2.mlp.down_proj"]
    for r in rows:
        assert all(r[c] > 0 for c in energy_cols)
        for k in ("efficacy", "generalization", "specificity", "locality"):
            assert 0.0 <= r[k] <= 1.0
    assert [r["eval_requests"] for r in rows] == [4, 2, 4]
    assert rows[1]["seconds_total"] > 0 and rows[1]["seconds_sphere"] > 0
    # The edits changed the weights, so the energy moved.
    assert rows[2][energy_cols[0]] != rows[0][energy_cols[0]]
    assert (out / "edits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for n in (0, 1, 2):
        blob = json.loads((out / "metrics" / f"batch_{n:05d}.json").read_text())
        assert blob["batch"] == n and set(blob["energy"]) == {c[len("energy:"):] for c in energy_cols}
    final = json.loads((out / "metrics" / "batch_00002.json").read_text())
    assert final["metrics"]["n_requests"] == 4 and final["metrics"]["efficacy"] == rows[2]["efficacy"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edits"] == 4 and summary["batches"] == 2 and summary["sphere"] is True
    assert summary["after"]["efficacy"] == rows[2]["efficacy"]
    assert 0 < summary["sphere_share"] < 1
    assert json.loads((out / "run.json").read_text())["method"] == "alphaedit"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["batch-000001", "batch-000002"]


def test_keep_checkpoints_keeps_the_newest(env, full_run):
    from safetensors.torch import load_file

    out = env["root"] / "keep"
    assert main(_args(env, out, "--keep-checkpoints", "1")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["batch-000002"]
    a = load_file(str(full_run / "checkpoints" / "batch-000002" / "weights.safetensors"))
    b = load_file(str(out / "checkpoints" / "batch-000002" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overlap_sphere_fit_edits_the_same(env, full_run, monkeypatch):
    """--overlap-sphere-fit reaches the Editor (every batch fits in the background) and changes no edit."""
    from safetensors.torch import load_file

    from sphere_fast.editing import editor as editor_module

    started = []

    class CountedPrefit(editor_module._Prefit):
        def __init__(self, *args, **kwargs):
            started.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(editor_module, "_Prefit", CountedPrefit)
    out = env["root"] / "overlap"
    assert main(_args(env, out, "--overlap-sphere-fit")) == 0
    assert len(started) == 2  # two batches
    a = load_file(str(full_run / "checkpoints" / "batch-000002" / "weights.safetensors"))
    b = load_file(str(out / "checkpoints" / "batch-000002" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_csv(out / "edits.csv")[-1]["efficacy"] == read_csv(full_run / "edits.csv")[-1]["efficacy"]


def test_resume_after_a_crash_matches_the_full_run(env, full_run, monkeypatch):
    from safetensors.torch import load_file

    from sphere_fast.editing.editor import Editor

    out = env["root"] / "crashed"
    real = Editor.edit_batch
    calls = {"n": 0}

    def crash_on_second(self, requests):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(self, requests)

    monkeypatch.setattr(Editor, "edit_batch", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(env, out))
    assert [r["batch"] for r in read_csv(out / "edits.csv")] == [0, 1]
    monkeypatch.setattr(Editor, "edit_batch", real)

    # Without --resume the checkpoints are protected.
    with pytest.raises(SystemExit, match="already holds checkpoints: pass --resume"):
        main(_args(env, out))
    # With other settings, resume refuses.
    with pytest.raises(SystemExit, match=r"--resume: .* holds a different run \(batch_size: was 2, now 1"):
        main(_args(env, out, "--resume", batch="1"))

    assert main(_args(env, out, "--resume")) == 0
    a = load_file(str(full_run / "checkpoints" / "batch-000002" / "weights.safetensors"))
    b = load_file(str(out / "checkpoints" / "batch-000002" / "weights.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = read_csv(full_run / "edits.csv"), read_csv(out / "edits.csv")
    assert [r["batch"] for r in rows_b] == [0, 1, 2]
    for ra, rb in zip(rows_a, rows_b):
        for k in ra:
            if not k.startswith("seconds"):
                assert ra[k] == rb[k], k


def test_argument_errors(env, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--model '.*nope': directory not found"):
        main(_args({**env, "model": str(tmp_path / "nope")}, tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not a Hugging Face model directory"):
        main(_args({**env, "model": str(tmp_path / "empty")}, tmp_path / "o"))
    with pytest.raises(SystemExit, match=r"--data '.*absent.json': file not found"):
        main(_args({**env, "data": str(tmp_path / "absent.json")}, tmp_path / "o"))
    small = tmp_path / "three.json"
    small.write_text(json.dumps(json.loads(paths.counterfact_path().read_text())[:3]))
    with pytest.raises(SystemExit, match="--edits 5: .* holds only 3 editable requests"):
        main(_args({**env, "data": str(small)}, tmp_path / "o", edits="5"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "target_new": "y"}]))
    with pytest.raises(SystemExit, match=r"--data: .*record 0 \(easyedit schema\): missing field 'subject'"):
        main(_args({**env, "data": str(bad)}, tmp_path / "o", edits="1"))
    hp = tmp_path / "hp.yaml"
    hp.write_text("layers: [1]\nbogus_key: 3\n")
    with pytest.raises(SystemExit, match=r"--hparams .*unknown hparam key\(s\) \['bogus_key'\]"):
        main(_args({**env, "hparams": str(hp)}, tmp_path / "o"))
    for bad_args, flag in ((["--edits", "0"], "--edits"), (["--batch-size", "x"], "--batch-size"),
                           (["--eta", "1.5"], "--eta"), (["--eta", "0"], "eta must be in (0, 1]")):
        args = _args(env, tmp_path / "o")
        i = args.index(bad_args[0]) if bad_args[0] in args else len(args)
        args[i:i + 2] = bad_args
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["edit", "--model", env["model"], "--data", env["data"], "--method", "rome", "--edits", "1",
              "--batch-size", "1", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "--method" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a refused command


def test_building_the_parser_defers_heavy_imports():
    code = ("import sys; from sphere_fast import cli; cli.build_parser(); print(sorted(m for m in ('transformers', "
            "'matplotlib', 'sphere_fast.editing.editor', 'sphere_fast.harness.running') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_edit_takes_the_shipped_settings_of_a_named_model(monkeypatch, tmp_path, capsys):
    """Without --hparams, `edit --model smollm2` uses the shipped file for --method and --sphere (by name or as
    its converted directory); other models get none (settings sized to the model); --hparams wins."""
    from sphere_fast import cli
    from sphere_fast.editing.hparams import load_hparams
    from sphere_fast.harness import model_sources, running

    entry = tmp_path / "models" / "smollm2"
    monkeypatch.setattr(model_sources, "models_dir", lambda: tmp_path / "models")
    data = tmp_path / "two.json"  # read, never edited: run_edit is replaced below
    data.write_text(json.dumps([{"prompt": f"The mother tongue of Kalo{i} is", "subject": f"Kalo{i}",
                                 "target_new": "English"} for i in range(2)]))
    base = ["edit", "--data", str(data), "--edits", "2", "--batch-size", "1", "--quiet"]
    parse = lambda *extra: cli.build_parser().parse_args(base + ["--out", str(tmp_path / "o"), *extra])  # noqa: E731
    for extra, expected in ((["--method", "alphaedit"], "SPHERE/smollm2-135m"),
                            (["--method", "alphaedit", "--no-sphere"], "AlphaEdit/smollm2-135m"),
                            (["--method", "memit"], "MEMIT/smollm2-135m"),
                            (["--method", "memit", "--no-sphere"], "MEMIT/smollm2-135m")):
        assert cli._shipped_hparams(parse("--model", "smollm2", *extra), entry) == expected
        assert cli._shipped_hparams(parse("--model", str(entry), *extra), entry) == expected
        assert cli._shipped_hparams(parse("--model", str(tmp_path / "other"), *extra), tmp_path / "other") is None

    # The command passes them to run_edit and records them in run.json (no model is loaded, nothing is edited).
    calls = []
    monkeypatch.setattr(model_sources, "resolve_model", lambda spec, log=None: entry)
    monkeypatch.setattr(model_sources, "load_model", lambda spec, **kwargs: ("model", "tokenizer"))
    monkeypatch.setattr(running, "run_edit", lambda **kwargs: calls.append(kwargs) or {
        "edits": 2, "batches": 2, "after": {}, "energy_drift": {}, "edit_seconds": 0.0, "sphere_share": None})
    assert cli.main(base + ["--model", "smollm2", "--method", "alphaedit", "--out", str(tmp_path / "a")]) == 0
    assert calls[-1]["hparams"] == load_hparams("SPHERE/smollm2-135m")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["hparams"] == "SPHERE/smollm2-135m"
    assert "the shipped settings SPHERE/smollm2-135m" in capsys.readouterr().err
    assert cli.main(base + ["--model", "smollm2", "--method", "memit", "--hparams", "AlphaEdit/llama3-8b",
                            "--out", str(tmp_path / "b")]) == 0
    assert calls[-1]["hparams"] == load_hparams("AlphaEdit/llama3-8b")
    assert json.loads((tmp_path / "b" / "run.json").read_text())["hparams"] == "AlphaEdit/llama3-8b"
    monkeypatch.setattr(model_sources, "resolve_model", lambda spec, log=None: tmp_path / "other")
    assert cli.main(base + ["--model", "other", "--method", "alphaedit", "--out", str(tmp_path / "c")]) == 0
    assert calls[-1]["hparams"] is None
    assert json.loads((tmp_path / "c" / "run.json").read_text())["hparams"] is None


@needs_data
def test_train_lm_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPHERE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    args = ["train-lm", "--preset", "tiny", "--steps", "3", "--device", "cpu", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "copy")]) == 0
    first = capsys.readouterr().out
    assert first.startswith("trained model ") and "held-out perplexity" in first
    assert (tmp_path / "copy" / "model.safetensors").exists() and (tmp_path / "copy" / "tokenizer.json").exists()
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("reused cached model ")
    with pytest.raises(SystemExit, match="hidden_size .* divisible by num_heads"):
        main(args + ["--hidden-size", "30", "--heads", "4"])


@needs_data
def test_demo_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """The demo's whole path (train, synthetic requests, both runs, table, plot) on the tiny preset."""
    from sphere_fast.harness.demo import run_demo
    from sphere_fast.harness.train_lm import PRESETS

    monkeypatch.setenv("SPHERE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    result = run_demo(model="train-lm", edits=4, batch_size=2, out=tmp_path / "demo", device="cpu", synthetic=True,
                      progress=False, train_config=PRESETS["tiny"].replace(steps=3),
                      hparams_overrides={"v_num_grad_steps": 4, "mom2_n_samples": 60})
    printed = capsys.readouterr().out
    assert "AlphaEdit + SPHERE" in printed and "energy drift %" in printed and "unedited" in printed
    assert [row["run"] for row in result["table"]] == ["unedited", "AlphaEdit", "AlphaEdit + SPHERE"]
    runs = result["runs"]
    assert runs["AlphaEdit"]["sphere_share"] == 0.0 and runs["AlphaEdit + SPHERE"]["sphere_share"] > 0
    # SPHERE changes the update, so the two runs end with different energies.
    assert runs["AlphaEdit"]["energy_drift"] != runs["AlphaEdit + SPHERE"]["energy_drift"]
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["edits"] == 4
    assert (tmp_path / "demo" / "demo_examples.png").read_bytes()[:4] == b"\x89PNG"
    # Three facts, each with its rewrite prompt, a paraphrase and a neighbour, continued by all three models.
    examples = result["continuations"]
    assert [row["kind"] for row in examples] == ["rewrite", "paraphrase", "neighbour"] * 3
    assert all(set(row) >= {"unedited", "AlphaEdit", "AlphaEdit + SPHERE"} for row in examples)
    assert "Greedy continuations" in printed and examples[0]["prompt"] in printed
    assert result["hparams_source"] == "default_hparams"
    for sub in ("alphaedit", "alphaedit_sphere"):
        assert [r["edits"] for r in read_csv(tmp_path / "demo" / sub / "edits.csv")] == [0, 2, 4]


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_edit_a_gguf_model_and_save_the_edited_model(env, full_run, capsys):
    """--model FILE.gguf converts once into the cache; --save-model writes a directory that differs from the
    unedited model in the edited weights only, and equals the run from the original directory."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.harness.fixtures import write_llama_gguf

    root = env["root"]
    write_llama_gguf(AutoModelForCausalLM.from_pretrained(env["model"]), AutoTokenizer.from_pretrained(env["model"]),
                     root / "tiny.gguf")
    out, saved = root / "gguf-run", root / "edited-model"
    assert main(_args({**env, "model": str(root / "tiny.gguf")}, out, "--save-model", str(saved))) == 0
    assert f"wrote the edited model to {saved}" in capsys.readouterr().out
    converted = json.loads((out / "run.json").read_text())["model"]
    assert converted.startswith(str(root / "cache" / "models" / "tiny-"))

    before, after = _state(env["model"]), _state(saved)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    # The same edits as from the original directory, bit for bit.
    final = load_file(str(full_run / "checkpoints" / "batch-000002" / "weights.safetensors"))
    for name, weight in final.items():
        assert torch.equal(after[name + ".weight"], weight), name
    tok = AutoTokenizer.from_pretrained(saved)
    assert tok("The mother tongue of")["input_ids"] == AutoTokenizer.from_pretrained(env["model"])(
        "The mother tongue of")["input_ids"]


def test_save_model_refuses_a_non_empty_directory_before_editing(env, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"--save-model: save directory '.*taken' exists and is not empty"):
        main(_args(env, tmp_path / "o", "--save-model", str(tmp_path / "taken")))
    assert not (tmp_path / "o").exists() and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not a directory"):
        main(_args(env, tmp_path / "o", "--save-model", str(tmp_path / "file")))


def test_demo_uses_smollm2_unless_told_otherwise(monkeypatch, tmp_path):
    """The demo command's model choice: the named model by default, any --model form, or train-lm."""
    from sphere_fast.harness import demo, model_sources

    resolved, demo_calls = [], []
    monkeypatch.setattr(model_sources, "resolve_model",
                        lambda spec, log=None: resolved.append(str(spec)) or tmp_path / str(spec))
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: demo_calls.append(kwargs) or {})
    assert main(["demo", "--device", "cpu", "--quiet", "--out", str(tmp_path / "d")]) == 0
    assert resolved == ["smollm2"] and demo_calls[-1]["model"] == tmp_path / "smollm2"
    assert demo_calls[-1]["save_model_dir"] is None
    assert main(["demo", "--model", "some.gguf", "--save-model", str(tmp_path / "s"), "--out", str(tmp_path / "d")]) == 0
    assert resolved[-1] == "some.gguf" and demo_calls[-1]["save_model_dir"] == tmp_path / "s"
    assert main(["demo", "--model", "train-lm", "--out", str(tmp_path / "d")]) == 0
    assert demo_calls[-1]["model"] == "train-lm" and len(resolved) == 2
    monkeypatch.undo()
    from sphere_fast.harness.train_lm import PRESETS

    with pytest.raises(ValueError, match="train_config applies to model='train-lm' only"):
        demo.run_demo(model="smollm2", train_config=PRESETS["tiny"], out=tmp_path / "d2")
    assert not (tmp_path / "d2").exists()


def test_quiet_stops_the_transformers_progress_bars_too(monkeypatch, tmp_path):
    from transformers.utils import logging

    from sphere_fast.harness import demo, model_sources

    monkeypatch.setattr(model_sources, "resolve_model", lambda spec, log=None: tmp_path / str(spec))
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: {})
    logging.enable_progress_bar()
    try:
        assert main(["demo", "--device", "cpu", "--out", str(tmp_path / "d")]) == 0
        assert logging.is_progress_bar_enabled()
        assert main(["demo", "--device", "cpu", "--quiet", "--out", str(tmp_path / "d")]) == 0
        assert not logging.is_progress_bar_enabled()
    finally:
        logging.enable_progress_bar()


def test_demo_help_gives_the_sizes_run_demo_uses(capsys):
    from sphere_fast.harness.demo import CPU_SIZES, GPU_SIZES

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {CPU_SIZES['edits']} on a CPU, {GPU_SIZES['edits']} on a GPU)" in text
