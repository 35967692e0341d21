"""The demo's pieces that need no model: shipped settings per named model, sizes, example rows, their plot."""
from __future__ import annotations

import pytest

from sphere_fast.editing.hparams import load_hparams, shipped_for_model
from sphere_fast.editing.requests import EditRequest
from sphere_fast.harness import demo


def _request(subject: str, rephrase=True, neighbour=True) -> EditRequest:
    return EditRequest(
        prompt="The mother tongue of {} is", subject=subject, target_new="English", target_true="French",
        rephrase_prompts=(f"{subject} speaks",) if rephrase else (),
        neighborhood_prompts=("The mother tongue of Jean Gabin is",) if neighbour else (),
        neighborhood_targets=("French",) if neighbour else (),
    )


def test_smollm2_gets_its_shipped_settings_by_name_or_cache_directory(monkeypatch, tmp_path):
    from sphere_fast.harness import model_sources

    monkeypatch.setattr(model_sources, "models_dir", lambda: tmp_path / "models")
    # The demo's choice: the AlphaEdit file for both runs, for smollm2 by name or by its converted directory.
    shipped = lambda model, model_dir: shipped_for_model(  # noqa: E731
        model_sources.named_model(model, model_dir), "alphaedit", sphere=False)
    assert shipped("smollm2", tmp_path / "elsewhere") == "AlphaEdit/smollm2-135m"
    assert shipped(tmp_path / "models" / "smollm2", tmp_path / "models" / "smollm2") == "AlphaEdit/smollm2-135m"
    assert shipped("some/dir", tmp_path / "some" / "dir") is None
    # The shipped files exist, load, and agree except for what SPHERE adds.
    alpha, sphere, memit = (load_hparams(f"{m}/smollm2-135m") for m in ("AlphaEdit", "SPHERE", "MEMIT"))
    assert (sphere.cumulative_ratio, sphere.suppression_strength) == (0.5, 0.5)
    assert alpha.cumulative_ratio is None
    strip = lambda hp: {k: v for k, v in hp.to_dict().items()  # noqa: E731
                        if k not in ("alg_name", "cumulative_ratio", "suppression_strength", "P_loc")}
    assert strip(alpha) == strip(sphere)
    # MEMIT has no null space and no L2 (its file leaves them at the defaults): everything else agrees.
    shared = lambda hp: {k: v for k, v in strip(hp).items() if k not in ("L2", "nullspace_threshold")}  # noqa: E731
    assert shared(alpha) == shared(memit)
    assert alpha.v_loss_layer == 29 and alpha.layers[-1] < 30


def test_example_rows_follow_each_fact_and_skip_missing_prompts():
    requests = [_request("Danielle Darrieux"), _request("Toko Yasuda", rephrase=False)]
    prompts = [p for r in requests for p in demo._example_prompts(r)]
    assert len(prompts) == 5
    continuations = {"unedited": [f"u{i}" for i in range(5)], "AlphaEdit": [f"a{i}" for i in range(5)]}
    rows = demo._example_rows(requests, continuations)
    assert [(r["kind"], r["unedited"], r["AlphaEdit"]) for r in rows] == [
        ("rewrite", "u0", "a0"), ("paraphrase", "u1", "a1"), ("neighbour", "u2", "a2"),
        ("rewrite", "u3", "a3"), ("neighbour", "u4", "a4")]
    assert rows[2]["wanted"] == "French" and rows[0]["wanted"] == "English"
    assert rows[0]["fact"] == "Danielle Darrieux: French -> English"
    text = demo.format_examples(rows)
    assert text.count("* ") == 2 and "...'a4'" in text and "paraphrase (wanted: 'English')" in text


def test_plot_examples_writes_a_png(tmp_path):
    rows = demo._example_rows([_request("Danielle Darrieux")], {"unedited": ["a", "b", "c"]})
    table = [{"run": "unedited", "efficacy": 0.1, "generalization": 0.0, "specificity": 0.2, "locality": None}]
    demo.plot_examples(table, rows, tmp_path / "x.png", title="t")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name,value", [("edits", 0), ("batch_size", -1), ("edits", 2.5)])
def test_bad_sizes_are_refused_before_anything_runs(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        demo.run_demo(model="nonexistent-dir", out=tmp_path / "d", device="cpu", **{name: value})
    assert not (tmp_path / "d").exists()



def test_an_unknown_method_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="memit, alphaedit, rect, prune, ft; got 'rome'"):
        demo.run_demo(model="nonexistent-dir", method="rome", out=tmp_path / "d", device="cpu")
    assert not (tmp_path / "d").exists()


def test_demo_with_another_method(tmp_path, monkeypatch):
    """--method rect: both runs edit with RECT, labelled and stored by its name, SPHERE at RECT's alpha 0.8."""
    from sphere_fast.harness.report import read_csv
    from sphere_fast.harness.train_lm import PRESETS

    monkeypatch.setenv("SPHERE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    result = demo.run_demo(model="train-lm", method="RECT", edits=2, batch_size=2, out=tmp_path / "demo",
                           device="cpu", synthetic=True, progress=False, log=lambda *_: None,
                           train_config=PRESETS["tiny"].replace(steps=3),
                           hparams_overrides={"v_num_grad_steps": 2, "mom2_n_samples": 60})
    assert result["method"] == "rect"
    assert [row["run"] for row in result["table"]] == ["unedited", "RECT", "RECT + SPHERE"]
    assert result["runs"]["RECT"]["sphere_share"] == 0.0 and result["runs"]["RECT + SPHERE"]["sphere_share"] > 0
    for sub in ("rect", "rect_sphere"):
        assert [r["edits"] for r in read_csv(tmp_path / "demo" / sub / "edits.csv")] == [0, 2]
    assert not (tmp_path / "demo" / "alphaedit").exists()
