"""The study: spec checks, resume after a budget stop, a collapsed run, a report from half-finished runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sphere_fast.editing.editor import Editor
from sphere_fast.editing.memit import MEMIT
from sphere_fast.harness import study, study_baseline, study_spec
from sphere_fast.harness.report import read_csv, read_json
from sphere_fast.harness.sequential import checkpoint_weights, latest_checkpoint
from sphere_fast.harness.study import run_study
from sphere_fast.harness.study_report import spearman, write_report
from sphere_fast.harness.study_spec import StudySpecError, load_spec, shipped_spec, spec_requests

from tests.editing.fixtures import counterfact_requests, subject_end_requests, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "cache")]


def _records(requests):
    return [{"case_id": r.case_id, "prompt": r.text, "subject": r.subject, "target_new": r.target_new,
             "ground_truth": r.target_true or "", "rephrase_prompt": r.text,
             "locality_prompt": f"{r.subject} is known for", "locality_ground_truth": r.target_true or "x"}
            for r in requests]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("study-data")
    (folder / "edit.json").write_text(json.dumps(_records(subject_end_requests(tok, 6))))
    (folder / "train.json").write_text(json.dumps(_records(counterfact_requests(12, offset=200))))
    (folder / "text.txt").write_text(" ".join(["The city of Paris is the capital of France."] * 120))
    return folder


def spec_dict(files, **changes):
    spec = {"model": "tiny", "data": str(files / "edit.json"), "horizon": 6, "batch_size": 2, "eval_every": 2,
            "eval_sample": 3, "full_eval_at": [6], "runs": [{"name": "memit", "method": "memit"},
                                                            {"name": "alphaedit+sphere", "method": "alphaedit+sphere"}],
            "general_text": str(files / "text.txt"), "general_tokens": 256, "general_seq_len": 32,
            "retention_data": str(files / "train.json"), "retention_candidates": 12, "fluency_prompts": 2,
            "fluency_tokens": 4, "eval_batch_size": 8,
            "hparams_overrides": {"mom2_n_samples": 64, "v_num_grad_steps": 3}}
    spec.update(changes)
    return spec


def loader(tok):
    return lambda: (tiny_model("llama", tok), tok)


@pytest.mark.parametrize("change,field", [
    ({"runs": [{"method": "rome"}]}, "runs[0].method"),
    ({"horizon": 50}, "horizon"),
    ({"data": "/nonexistent/edit.json"}, "data"),
    ({"eval_every": 3}, "eval_every"),
    ({"batch": 2}, "batch"),
    ({"runs": [{"method": "memit", "alpha": 1.5}]}, "runs[0].alpha"),
    ({"runs": [{"method": "memit+sphere", "eta": 0}]}, "runs[0].eta"),
    ({"hparams_overrides": {"v_num_grad_stepz": 3}}, "hparams_overrides"),
    ({"runs": [{"method": "memit", "hparams": "/nonexistent/memit.yaml"}]}, "runs[0].hparams"),
    ({"runs": [{"method": "memit", "hparams": "MEMIT/smollm2-135m"}], "hparams_overrides": {"L2": "big"}},
     "hparams_overrides"),
])
def test_bad_spec_names_the_field_and_writes_nothing(files, tok, tmp_path, change, field):
    out = tmp_path / "out"
    with pytest.raises(StudySpecError) as info:
        run_study(load_spec(spec_dict(files, **change)), out, load=loader(tok))
    assert info.value.field == field, str(info.value)
    assert not out.exists()


def test_unreadable_spec_file_through_the_cli(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("runs: [memit\n")  # not YAML
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sphere_fast.cli", "study", "--spec", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sphere-fast study: error: spec:"), proc.stderr
    assert not out.exists()
    missing = subprocess.run([sys.executable, "-m", "sphere_fast.cli", "study", "--spec", str(tmp_path / "no.yaml"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "cannot read" in missing.stderr and not out.exists()


def test_shipped_spec_loads():
    spec = load_spec(shipped_spec())
    assert spec.horizon == 3000 and spec.full_eval_at == (1000, 2000, 3000)
    assert [r.name for r in spec.runs] == ["memit", "memit+sphere", "alphaedit", "alphaedit+sphere"]
    assert spec.runs[1].alpha == 0.8 and spec.runs[3].alpha == 0.5


def _run_out_of_budget_in_the_first_batch(spec, out, tok, monkeypatch, cache):
    """run_study whose budget runs out during the first batch: it stops at the next checkpoint."""
    real_edit, real_time, spent = Editor.edit_batch, study.time.time, []

    def edit_batch(self, requests):
        spent.append(1)
        return real_edit(self, requests)

    monkeypatch.setattr(Editor, "edit_batch", edit_batch)
    monkeypatch.setattr(study.time, "time", lambda: real_time() + (3600.0 if spent else 0.0))
    try:
        return run_study(spec, out, budget_minutes=10, load=loader(tok), log=lambda m: None)
    finally:
        monkeypatch.undo()
        monkeypatch.setenv("SPHERE_FAST_CACHE_DIR", str(cache))  # undo() dropped the cache fixture's


def test_resume_after_budget_stop_matches_an_uninterrupted_study(files, tok, tmp_path, monkeypatch):
    spec = load_spec(spec_dict(files))
    whole = run_study(spec, tmp_path / "whole", load=loader(tok), log=lambda m: None)
    assert {s["state"] for s in whole.values()} == {"done"}

    out = tmp_path / "stopped"
    first = _run_out_of_budget_in_the_first_batch(spec, out, tok, monkeypatch, tmp_path / "cache")
    assert first["memit"]["state"] == "paused" and first["memit"]["edits"] == 2  # stopped at the first checkpoint
    assert "alphaedit+sphere" not in first or first["alphaedit+sphere"]["state"] == "pending"
    half = write_report(out)  # a report from half-finished runs
    assert (out / "report" / "study.md").exists() and any(p.name == "metrics.png" for p in half)
    summary = read_json(out / "report" / "study.json")
    assert summary["states"]["memit"]["state"] == "paused"

    again = run_study(spec, out, load=loader(tok), log=lambda m: None)
    assert {s["state"] for s in again.values()} == {"done"}
    for run in ("memit", "alphaedit+sphere"):
        a = read_csv(tmp_path / "whole" / "runs" / run / "edits.csv")
        b = read_csv(out / "runs" / run / "edits.csv")
        assert [r["edits"] for r in a] == [r["edits"] for r in b] == [0, 2, 4, 6]
        for ra, rb in zip(a, b):
            for key in ra:
                if key.startswith("energy:") or key in ("efficacy", "locality", "perplexity", "kl"):
                    assert ra[key] == rb[key], (run, key, ra[key], rb[key])
    # Finished runs are not recomputed.
    before = (out / "runs" / "memit" / "edits.csv").read_bytes()
    run_study(spec, out, load=loader(tok), log=lambda m: None)
    assert (out / "runs" / "memit" / "edits.csv").read_bytes() == before
    written = {p.name for p in write_report(out)}
    assert {"study.md", "study.json", "metrics.png", "general.png", "energy.png", "geometry.png"} <= written
    # Evaluation cost per scored request, from the evaluated rows of edits.csv.
    rows = [r for r in read_csv(out / "runs" / "memit" / "edits.csv")[1:] if r["seconds_eval_edits"] not in ("", None)]
    per_request = sum(float(r["seconds_eval_edits"]) for r in rows) / sum(int(r["eval_requests"]) for r in rows)
    times = read_json(out / "report" / "study.json")["times"]["memit"]
    assert times["eval_s_per_request"] == pytest.approx(per_request) and per_request > 0


def test_another_spec_in_the_same_folder_is_refused(files, tok, tmp_path):
    out = tmp_path / "out"
    run_study(load_spec(spec_dict(files)), out, budget_minutes=0, load=loader(tok), log=lambda m: None)
    with pytest.raises(StudySpecError) as info:
        run_study(load_spec(spec_dict(files, seed=1)), out, load=loader(tok), log=lambda m: None)
    assert info.value.field == "spec"


def test_a_longer_horizon_continues_the_study(files, tok, tmp_path):
    """Grown from 4 edits to 6, a study keeps its records and ends as a study run to 6 from the start."""
    quiet = lambda m: None  # noqa: E731
    longer = load_spec(spec_dict(files, eval_sample=6))  # every evaluation scores every request: no samples
    run_study(longer, tmp_path / "whole", load=loader(tok), log=quiet)
    out = tmp_path / "grown"
    shorter = load_spec(spec_dict(files, horizon=4, full_eval_at=[4], eval_sample=6))
    run_study(shorter, out, load=loader(tok), log=quiet)
    first = {run: read_csv(out / "runs" / run / "edits.csv") for run in ("memit", "alphaedit+sphere")}
    old_key = read_json(out / "spec.json")["key"]
    assert study.pending_runs(shorter, out) == [] and study.pending_runs(longer, out) == ["memit", "alphaedit+sphere"]

    grown = run_study(longer, out, load=loader(tok), log=quiet)
    assert {s["state"] for s in grown.values()} == {"done"} and {s["edits"] for s in grown.values()} == {6}
    written = read_json(out / "spec.json")
    assert written["key"] == longer.key() != old_key and written["grown"][0]["from_horizon"] == 4
    assert not study_spec._work_dir(longer, out, old_key).exists()  # the checkpoints moved to the new key
    whole_base, grown_base = read_json(tmp_path / "whole" / "baseline.json"), read_json(out / "baseline.json")
    assert grown_base["edit_requests"] == 6
    for key, value in whole_base["edit_metrics"].items():
        assert grown_base["edit_metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-15)
    for run in ("memit", "alphaedit+sphere"):
        a = read_csv(tmp_path / "whole" / "runs" / run / "edits.csv")
        b = read_csv(out / "runs" / run / "edits.csv")
        assert [r["edits"] for r in a] == [r["edits"] for r in b] == [0, 2, 4, 6]
        assert b[1:3] == first[run][1:3]  # the records before the horizon grew are kept as they were
        assert b[0]["eval_requests"] == 6
        for ra, rb in zip(a[1:], b[1:]):
            for key in ra:
                if key.startswith("energy:") or key in ("efficacy", "specificity", "locality", "perplexity", "kl"):
                    assert ra[key] == rb[key], (run, ra["edits"], key, ra[key], rb[key])
    write_report(out)
    assert "The horizon grew from 4" in (out / "report" / "study.md").read_text()


def test_a_run_without_its_checkpoints_starts_again_without_its_old_records(files, tok, tmp_path, monkeypatch):
    """A grown study on a machine without the run's checkpoints edits again from 0; a budget that stops the redo
    early leaves no record of the old run past the redo's last batch."""
    quiet = lambda m: None  # noqa: E731
    one = [{"name": "memit", "method": "memit"}]
    shorter = load_spec(spec_dict(files, runs=one, horizon=4, full_eval_at=[4], eval_sample=6))
    out = tmp_path / "out"
    run_study(shorter, out, load=loader(tok), log=quiet)
    run_dir = out / "runs" / "memit"
    assert sorted(p.name for p in (run_dir / "metrics").iterdir()) == ["edits_00002.json", "edits_00004.json"]
    shutil.rmtree(study_spec.checkpoint_dir(shorter, out, "memit"))  # another machine

    longer = load_spec(spec_dict(files, runs=one, full_eval_at=[4, 6], eval_sample=6))
    stopped = _run_out_of_budget_in_the_first_batch(longer, out, tok, monkeypatch, tmp_path / "cache")
    assert stopped["memit"]["state"] == "paused" and stopped["memit"]["edits"] == 2
    assert [r["edits"] for r in read_csv(run_dir / "edits.csv")] == [0, 2]
    assert [p.name for p in (run_dir / "metrics").iterdir()] == ["edits_00002.json"]
    assert read_json(run_dir / "geometry.json")["edits"] == 2


def test_a_new_machine_keeps_the_baseline(files, tok, tmp_path):
    """Without the cache's unedited predictions (a new machine), they are computed again; baseline.json, the
    study's record (its retention facts among it), stays byte for byte."""
    spec = load_spec(spec_dict(files, horizon=2, full_eval_at=[2]))
    out = tmp_path / "out"
    run_study(spec, out, load=loader(tok), log=lambda m: None)
    ref_path = study_spec._work_dir(spec, out) / "reference.json"
    baseline, reference = (out / "baseline.json").read_bytes(), read_json(ref_path)
    ref_path.unlink()
    said = []
    study_baseline.prepare(spec, out, study_spec.spec_requests(spec), loader(tok), log=said.append)
    assert (out / "baseline.json").read_bytes() == baseline
    assert read_json(ref_path) == reference and "not in this cache" in said[0]


def test_edits_that_take_every_retention_subject_leave_fluency_unmeasured(files, tok, tmp_path):
    """Retention candidates drawn from the edited requests themselves: none is left to score retention or
    fluency on, so both are None (not a division by zero) in the baseline, the evaluations and the report."""
    spec = load_spec(spec_dict(files, horizon=2, full_eval_at=[2], eval_sample=2, retention_candidates=2,
                               retention_data=str(files / "edit.json"), runs=[{"name": "memit", "method": "memit"}]))
    out = tmp_path / "out"
    assert run_study(spec, out, load=loader(tok), log=lambda m: None)["memit"]["state"] == "done"
    baseline = read_json(out / "baseline.json")
    assert baseline["fluency_prompts"] == [] and baseline["retention"]["candidates"] == 0
    assert baseline["general"]["fluency"] is None and baseline["general"]["retention"] is None
    rows = read_csv(out / "runs" / "memit" / "edits.csv")
    assert rows[-1]["edits"] == 2 and rows[-1]["perplexity"] > 0
    assert rows[-1].get("fluency") in (None, "") and rows[-1].get("retention") in (None, "")
    write_report(out)  # the report takes the unmeasured columns


@pytest.mark.parametrize("change,why", [
    ({"eval_sample": 1}, "full_eval_at"),  # the evaluation at 4 scored every request; the longer spec samples
    ({"retention_first": True}, "subject"),  # the added requests edit the subject of a fluency prompt
])
def test_a_longer_horizon_that_would_change_the_records_is_refused(files, tok, tmp_path, change, why):
    changes = {"eval_sample": change.get("eval_sample", 6)}
    if change.get("retention_first"):
        retention = tmp_path / "retention.json"
        requests = subject_end_requests(tok, 6)[4:5] + counterfact_requests(12, offset=200)
        retention.write_text(json.dumps(_records(requests)))
        changes["retention_data"] = str(retention)
    out = tmp_path / "out"
    run_study(load_spec(spec_dict(files, horizon=4, full_eval_at=[4], **changes)), out, budget_minutes=0,
              load=loader(tok), log=lambda m: None)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StudySpecError) as info:
        run_study(load_spec(spec_dict(files, **changes)), out, load=loader(tok), log=lambda m: None)
    assert info.value.field == "horizon" and why in str(info.value), str(info.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_collapsed_run_is_recorded_and_the_study_goes_on(files, tok, tmp_path, monkeypatch):
    """MEMIT's second batch diverges (its update turns NaN): recorded as a collapse, not a crash."""
    real = MEMIT.layer_update
    calls = []

    def diverging(self, name, K, R, W):
        calls.append(name)
        delta = real(self, name, K, R, W)
        return delta * float("nan") if len(calls) > len(self.hparams.layers) else delta

    monkeypatch.setattr(MEMIT, "layer_update", diverging)
    out = tmp_path / "out"
    statuses = run_study(load_spec(spec_dict(files)), out, load=loader(tok), log=lambda m: None)
    assert statuses["memit"]["state"] == "collapsed"
    assert statuses["memit"]["edits"] == 2 and statuses["memit"]["collapsed_at"] == 4
    assert statuses["memit"]["reason"].startswith("EditCollapsed") and "NaN/Inf" in statuses["memit"]["reason"]
    assert statuses["alphaedit+sphere"]["state"] == "done"
    md = (write_report(out)[1]).read_text()
    assert "collapsed" in md
    # A collapsed run stays collapsed: calling again does not retry it.
    assert run_study(load_spec(spec_dict(files)), out, load=loader(tok), log=lambda m: None)["memit"]["state"] == \
        "collapsed"


def test_a_bug_is_not_a_collapse(files, tok, tmp_path, monkeypatch):
    """An error that is not the run's numerical failure stops the study, whatever its message says."""
    def broken(self, name, K, R, W):
        raise RuntimeError("Inference tensors cannot be saved for backward")

    monkeypatch.setattr(MEMIT, "layer_update", broken)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        run_study(load_spec(spec_dict(files)), tmp_path / "out", load=loader(tok), log=lambda m: None)
    assert read_json(tmp_path / "out" / "runs" / "memit" / "status.json")["state"] == "running"


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


def test_rect_prune_and_ft_run_through_the_study(files, tok, tmp_path, capsys):
    runs = [{"name": "rect+sphere", "method": "rect+sphere"}, {"name": "prune", "method": "prune"},
            {"name": "ft+sphere", "method": "ft+sphere", "alpha": 0.5}]
    statuses = run_study(load_spec(spec_dict(files, runs=runs, horizon=2, full_eval_at=[2])), tmp_path / "out",
                         load=loader(tok), log=lambda m: None)
    assert {name: s["state"] for name, s in statuses.items()} == {r["name"]: "done" for r in runs}
    # The records name the order of each run's updates (the public code's; FT has none).
    assert {name: s["hparams"]["update_order"] for name, s in statuses.items()} == {
        "rect+sphere": "after_layers", "prune": "after_layers", "ft+sphere": None}
    for run in runs:
        rows = read_csv(tmp_path / "out" / "runs" / run["name"] / "edits.csv")
        assert [r["edits"] for r in rows] == [0, 2] and 0.0 <= rows[-1]["efficacy"] <= 1.0
        # Each batch's per-layer numbers: the update's norm, SPHERE's rank when on, PRUNE's restraint.
        layers = [k[len("energy:"):] for k in rows[0] if k.startswith("energy:")]
        assert all(rows[-1][f"update_norm:{layer}"] > 0 for layer in layers)
        assert all((f"rank:{layer}" in rows[-1]) == run["method"].endswith("+sphere") for layer in layers)
        assert all((f"restrained_singular_values:{layer}" in rows[-1]) == (run["name"] == "prune") for layer in layers)
    # bench/prune_restraint.py reads the PRUNE run's checkpoint: D = W - W0 against sigma_max(W0).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import prune_restraint

    assert prune_restraint.main(["--out", str(tmp_path / "out")]) == 0
    found = read_json(tmp_path / "out" / "prune_restraint.json")
    assert list(found) == ["prune"] and found["prune"]["edits"] == 2
    last = read_csv(tmp_path / "out" / "runs" / "prune" / "edits.csv")[-1]
    unedited = tiny_model("llama", tok)
    for row in found["prune"]["layers"]:
        W0 = unedited.get_submodule(row["layer"]).weight.detach().double()
        assert row["sigma_max_W0"] == pytest.approx(float(torch.linalg.matrix_norm(W0, ord=2)), rel=1e-12)
        assert 0 < row["ratio"] == pytest.approx(row["sigma_max_D"] / row["sigma_max_W0"])
        assert row["above"] == last[f"restrained_singular_values:{row['layer']}"]
    # bench/neighbour_answers.py scores each checkpoint's neighbourhood answers as the study does.
    import neighbour_answers

    spec = load_spec(read_json(tmp_path / "out" / "spec.json")["spec"])
    found = neighbour_answers.neighbour_answers(spec, tmp_path / "out", tiny_model("llama", tok), tok)
    assert set(found) == {"requests", "skipped", "unedited", *[r["name"] for r in runs]}
    for run in runs:
        last = read_csv(tmp_path / "out" / "runs" / run["name"] / "edits.csv")[-1]
        assert found[run["name"]]["edits"] == 2
        assert found[run["name"]]["specificity"] == pytest.approx(last["specificity"], abs=1e-12)
    assert found["unedited"]["answer_is_an_edit_target"] >= 0 and "gained" not in found["unedited"]
    # The scripts' --out/--only: the spec read back from the folder; an --only name it lacks is a usage error.
    import benchutil

    folder = ["--out", str(tmp_path / "out")]
    assert benchutil.study_folder_args("", "unused", [*folder, "--only", "prune"]) == (tmp_path / "out", spec, ("prune",))
    with pytest.raises(SystemExit) as info:
        benchutil.study_folder_args("", "unused", [*folder, "--only", "prune", "memit"])
    assert info.value.code == 2
    assert f"--only: no run named memit in {tmp_path / 'out' / 'spec.json'}" in capsys.readouterr().err


def test_a_request_the_editor_refuses_is_skipped_and_left_out_of_evaluations(files, tok, tmp_path):
    records = json.loads((files / "edit.json").read_text())
    records[3]["prompt"] = records[3]["prompt"].replace(records[3]["subject"], records[3]["subject"] + "'s")
    records[3]["subject"] = records[3]["subject"] + "'"  # no longer a token boundary inside the prompt
    data = tmp_path / "edit.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    statuses = run_study(load_spec(spec_dict(files, data=str(data), runs=["memit"])), out, load=loader(tok),
                         log=lambda m: None)
    assert statuses["memit"]["state"] == "done" and [int(k) for k in statuses["memit"]["skipped"]] == [3]
    final = read_json(out / "runs" / "memit" / "metrics" / "edits_00006.json")
    assert final["metrics"]["n_requests"] == 5


def test_geometry_follows_the_last_checkpoint(files, tok, tmp_path, monkeypatch):
    """A paused run's geometry.json is of its last checkpoint; a missing one (a run paused by an earlier
    version) is rebuilt from that checkpoint, equal to what the run wrote; at the horizon it is the end's."""
    spec = load_spec(spec_dict(files, runs=[{"name": "memit", "method": "memit"}]))
    out = tmp_path / "out"
    assert _run_out_of_budget_in_the_first_batch(spec, out, tok, monkeypatch, tmp_path / "cache")["memit"]["edits"] == 2
    path = out / "runs" / "memit" / "geometry.json"
    written = read_json(path)
    assert written["edits"] == 2 and written["mean_abs_cos_after"] != written["mean_abs_cos_before"]
    path.unlink()
    run_study(spec, out, budget_minutes=0, load=loader(tok), log=lambda m: None)  # no editing: the budget is spent
    assert read_json(out / "runs" / "memit" / "status.json")["edits"] == 2
    assert read_json(path) == written
    run_study(spec, out, load=loader(tok), log=lambda m: None)
    assert read_json(path)["edits"] == 6
    write_report(out)
    summary = read_json(out / "report" / "study.json")
    assert summary["geometry"]["memit"]["edits"] == 6
    assert "## Neuron geometry" in (out / "report" / "study.md").read_text()


def test_shipped_specs_load_by_name():
    methods = load_spec("smollm2-counterfact-methods")
    assert methods.horizon == 3000 and methods.full_eval_at == (1000, 2000, 3000) and [r.name for r in methods.runs] == [
        "rect", "rect+sphere", "prune", "prune+sphere", "ft", "ft+sphere"]
    assert all(r.alpha == 0.8 for r in methods.runs if r.sphere)
    assert methods.general_tasks == ("nq",) and methods.general_tasks == load_spec(shipped_spec()).general_tasks
    assert load_spec("smollm2-counterfact") == load_spec(shipped_spec())
    zsre = load_spec("smollm2-zsre")
    assert zsre.horizon == 900 and zsre.full_eval_at == (300, 600, 900) and zsre.eval_sample >= zsre.horizon
    assert [(r.name, r.alpha) for r in zsre.runs] == [(r.name, r.alpha) for r in load_spec(shipped_spec()).runs]
    with pytest.raises(StudySpecError, match="cannot read"):
        load_spec("no-such-spec")


def test_zsre_spec_reads_its_requests():
    spec = load_spec("smollm2-zsre")
    if not Path(spec.data).exists():
        pytest.skip(f"{spec.data} not present (set SPHERE_FAST_DATA_DIR)")
    requests = spec_requests(spec)  # the file's two records with an empty answer are skipped, not edited
    assert len(requests) == 900 and requests[0].target_new == "unmanned aircraft"
    assert all(r.neighborhood_prompts[0].startswith("nq question: ") for r in requests)
    assert "Michaela Staniford" not in {r.subject for r in requests}


def test_general_tasks_join_a_study_under_way(files, tok, tmp_path, monkeypatch):
    """general_tasks is evaluation-only: same key, the study continues, the unedited score goes in row 0 and
    the task is scored from the next evaluation on; the report shows it. An unknown task names the field."""
    from sphere_fast.editing import paths

    data = tmp_path / "data"  # the data folder with small task files in general/
    (data / "general").mkdir(parents=True)
    for entry in paths.data_dir().iterdir():
        if entry.name != "general":
            (data / entry.name).symlink_to(entry)
    (data / "general" / "test-OpenDomainQA.jsonl").write_text("\n".join(json.dumps(
        {"question": f"who wrote book {i}?", "answer": ["The Author"], "output": ["It was The Author."]})
        for i in range(3)))
    monkeypatch.setenv("SPHERE_FAST_DATA_DIR", str(data))
    plain = load_spec(spec_dict(files, runs=[{"name": "memit", "method": "memit"}]))
    with_nq = load_spec(spec_dict(files, runs=[{"name": "memit", "method": "memit"}], general_tasks=["nq"],
                                  general_task_samples=2))
    assert plain.key() == with_nq.key() and plain.to_dict() != with_nq.to_dict()
    out = tmp_path / "out"
    assert _run_out_of_budget_in_the_first_batch(plain, out, tok, monkeypatch, tmp_path / "cache")["memit"]["edits"] == 2
    monkeypatch.setenv("SPHERE_FAST_DATA_DIR", str(data))
    status = run_study(with_nq, out, load=loader(tok), log=lambda m: None)
    assert status["memit"]["state"] == "done"
    assert read_json(out / "spec.json")["spec"]["general_tasks"] == ["nq"]
    assert 0.0 <= read_json(out / "baseline.json")["general"]["nq"] <= 1.0
    rows = {int(r["edits"]): r for r in read_csv(out / "runs" / "memit" / "edits.csv")}
    assert "nq" in rows[0] and "nq" not in rows[2] and "nq" in rows[4] and "nq" in rows[6]
    write_report(out)
    assert " nq " in (out / "report" / "study.md").read_text()
    # bench/rescore_general_tasks.py scores the unedited model and the last checkpoint again, on the same
    # items with the same scorer: what the study recorded.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import rescore_general_tasks

    found = rescore_general_tasks.rescore(with_nq, out, tiny_model("llama", tok), tok)
    assert found["nq"]["unedited"] == {"edits": 0, "recorded": read_json(out / "baseline.json")["general"]["nq"],
                                       "now": found["nq"]["unedited"]["recorded"]}
    assert found["nq"]["memit"] == {"edits": 6, "recorded": rows[6]["nq"], "now": rows[6]["nq"]}
    # ... the run scored with its checkpoint's weights, the unedited model with its own, put back afterwards
    saved = checkpoint_weights(latest_checkpoint(study_spec.checkpoint_dir(with_nq, out, "memit")))
    name = sorted(saved)[0]
    model = tiny_model("llama", tok)
    weight = lambda m: m.get_submodule(name).weight.detach()  # noqa: E731
    monkeypatch.setattr(rescore_general_tasks, "evaluate_task",
                        lambda m, *args, **kwargs: {"accuracy": float(weight(m).double().sum())})
    before = weight(model).clone()
    found = rescore_general_tasks.rescore(with_nq, out, model, tok)
    assert found["nq"]["unedited"]["now"] == float(before.double().sum())
    assert found["nq"]["memit"]["now"] == float(saved[name].double().sum()) != found["nq"]["unedited"]["now"]
    assert torch.equal(weight(model), before)
    with pytest.raises(StudySpecError) as info:
        load_spec(spec_dict(files, general_tasks=["mmlu"]))
    assert info.value.field == "general_tasks[0]"


def test_sphere_gains_in_the_report(tmp_path):
    """Each method with and without SPHERE at the last edit count both evaluated, with the relative gain,
    in study.json, study.md and sphere_gain.png; a method without its pair is left out."""
    from sphere_fast.harness.report import write_csv, write_json
    from sphere_fast.harness.study_report import sphere_gains

    out = tmp_path / "out"
    runs = [{"name": "memit", "method": "memit"}, {"name": "memit+sphere", "method": "memit+sphere"},
            {"name": "ft", "method": "ft"}]
    spec = {"model": "tiny", "data": "edit.json", "horizon": 6, "batch_size": 2, "eval_every": 2, "eval_sample": 3,
            "full_eval_at": [2, 6], "runs": runs}
    write_json(out / "spec.json", {"spec": spec, "key": "k", "commit": None})
    scores = {"memit": {0: 0.1, 2: 0.5, 4: 0.4, 6: 0.2}, "memit+sphere": {0: 0.1, 2: 0.4, 4: 0.5}, "ft": {0: 0.1}}
    for name, by_edits in scores.items():
        rows = [{"batch": e // 2, "edits": e, "energy:layer": 100.0 + e, "efficacy": v, "generalization": v / 2,
                 "specificity": 0.1, "locality": 1.0} for e, v in by_edits.items()]
        write_csv(out / "runs" / name / "edits.csv", rows)
    written = {p.name for p in write_report(out)}
    assert "sphere_gain.png" in written
    (gain,) = read_json(out / "report" / "study.json")["sphere_gains"]
    assert gain["method"] == "memit" and gain["edits"] == 4  # memit+sphere stops at 4
    assert gain["efficacy"] == {"without": 0.4, "with": 0.5, "gain_percent": pytest.approx(25.0)}
    assert gain["specificity"]["gain_percent"] == 0.0
    assert "| memit | 4 | 0.400 -> 0.500 (25.0 %)" in (out / "report" / "study.md").read_text()
    assert sphere_gains(spec, {n: {"evals": []} for n in scores}) == []
    # The metrics table: the start, every evaluation that scored all requests (full_eval_at) and the last one.
    table = read_json(out / "report" / "study.json")["table"]
    assert [(row["run"], row["edits"]) for row in table] == [
        ("memit", 0), ("memit", 2), ("memit", 6), ("memit+sphere", 0), ("memit+sphere", 2), ("memit+sphere", 4),
        ("ft", 0)]


def test_default_jobs_and_pending_runs(files, tmp_path):
    assert study.default_jobs(4, 2, cuda=False) == 2  # one single-threaded process per core
    assert study.default_jobs(1, 16, cuda=False) == 1  # never more processes than runs left
    assert study.default_jobs(0, 2, cuda=False) == 1
    assert study.default_jobs(4, None, cuda=False) == 1
    assert study.default_jobs(4, 16, cuda=True) == 1  # one device, one model copy
    spec = load_spec(spec_dict(files))
    assert study.pending_runs(spec, tmp_path) == ["memit", "alphaedit+sphere"]
    (tmp_path / "runs" / "memit").mkdir(parents=True)
    (tmp_path / "runs" / "memit" / "status.json").write_text(json.dumps({"state": "done", "edits": 6}))
    assert study.pending_runs(spec, tmp_path) == ["alphaedit+sphere"]
    assert study.pending_runs(spec, tmp_path, only=["memit"]) == []
    (tmp_path / "runs" / "memit" / "status.json").write_text(json.dumps({"state": "done", "edits": 4}))
    assert study.pending_runs(spec, tmp_path) == ["memit", "alphaedit+sphere"]  # done to a shorter horizon


def test_worker_command_names_files_the_workers_can_find(tmp_path, monkeypatch):
    """The workers start in --out: a shipped spec's name becomes its file, a relative path becomes absolute,
    and a "data:" request path (resolved against the data folder, not the current one) is passed unchanged."""
    from sphere_fast.cli import build_parser, study_worker_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("{}")
    argv = ["study", "--out", "out", "--spec", "smollm2-counterfact-methods", "--data", "data:counterfact/x.json",
            "--horizon", "40", "--budget-minutes", "30"]
    cmd = study_worker_command(build_parser().parse_args(argv), tmp_path / "out", 1)
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert flags["--spec"] == str(shipped_spec("smollm2-counterfact-methods"))
    assert flags["--out"] == str(tmp_path / "out")
    assert flags["--data"] == "data:counterfact/x.json"
    assert (flags["--horizon"], flags["--budget-minutes"], flags["--jobs"], flags["--threads"]) == ("40", "30.0", "1", "1")
    argv[4] = "mine.yaml"
    cmd = study_worker_command(build_parser().parse_args(argv), tmp_path / "out", 1)
    assert dict(zip(cmd[4::2], cmd[5::2]))["--spec"] == str(tmp_path / "mine.yaml")


def test_jobs_give_the_baseline_every_core_and_each_worker_its_share(tmp_path, monkeypatch):
    """--jobs 2 --threads 3: the baseline runs alone on 6 threads, then each worker gets 3, in its torch
    pool (--threads) and in the OMP_NUM_THREADS its BLAS reads."""
    import subprocess as sp

    from sphere_fast import cli
    from sphere_fast.harness import study as study_module

    calls = []
    monkeypatch.setattr(study_module, "set_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(study_module, "run_study", lambda *a, **k: calls.append(("baseline", k["budget_minutes"])))

    class Worker:
        def __init__(self, cmd, cwd, env):
            calls.append(("worker", cmd[cmd.index("--threads") + 1], env["OMP_NUM_THREADS"], cmd[-1]))

        def wait(self):
            return 0

    monkeypatch.setattr(sp, "Popen", Worker)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # what the baseline's set_threads leaves for the parent
    args = cli.build_parser().parse_args(["study", "--out", str(tmp_path), "--threads", "3", "--jobs", "2"])
    cli._study_jobs(args, None, tmp_path, ["memit", "memit+sphere"], 2)
    assert calls == [("threads", 6), ("baseline", 0), ("worker", "3", "3", "memit"),
                     ("worker", "3", "3", "memit+sphere")]


def test_two_processes_through_the_cli_match_one_process(files, tok, tmp_path):
    """--jobs 2: the baseline in the calling process, then one worker process per run; the records are
    those of --jobs 1, which runs both in the calling process."""
    model_dir = tmp_path / "model"
    tiny_model("llama", tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "spec.json").write_text(json.dumps(spec_dict(files, model=str(model_dir))))
    for jobs in ("1", "2"):
        proc = subprocess.run([sys.executable, "-m", "sphere_fast.cli", "study", "--spec", str(tmp_path / "spec.json"),
                               "--out", str(tmp_path / f"jobs{jobs}"), "--jobs", jobs, "--threads", "1"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[study] the unedited model") == 1  # the baseline once, before the workers
    for run in ("memit", "alphaedit+sphere"):
        assert read_json(tmp_path / "jobs2" / "runs" / run / "status.json")["state"] == "done"
        a = read_csv(tmp_path / "jobs1" / "runs" / run / "edits.csv")
        b = read_csv(tmp_path / "jobs2" / "runs" / run / "edits.csv")
        assert [r["edits"] for r in a] == [r["edits"] for r in b] == [0, 2, 4, 6]
        diffs = [(ra["edits"], key, ra[key], rb[key]) for ra, rb in zip(a, b) for key in ra
                 if (key.startswith("energy:") or key in ("efficacy", "locality", "perplexity", "kl")) and ra[key] != rb[key]]
        assert not diffs, (run, diffs)
