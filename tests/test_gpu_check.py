"""scripts/gpu_check.sh as a dry run (no CUDA device): CI runs it so the GPU command cannot rot.

One run of every step against a temporary $OUT (about a minute on two cores; the GPU steps
skip, the rest runs at tiny shapes on CPU) with the CUDA build made to fail, then checks of what it
wrote: the results JSON and markdown, the end-to-end chart and the logs, within the limits of what
comes back from a GPU machine (at most 8 files, at most two folders deep), and that the failed build
took nothing else with it. Two short runs check the budget and a step timeout; --plan, which runs
nothing, checks that the step plan fits the budget.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_STEPS = ("install", "tests", "bench-cuda", "bench-kernels")
ALL_STEPS = ("install", "probe", "build", "accuracy", "tests", "bench-cuda", "bench-kernels", "bench-projection", "e2e",
             "bench-real")

pytestmark = pytest.mark.slow


def run_script(out: Path, tmp: Path, *args: str, timeout: int = 900, **env_extra: str):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp), **env_extra)
    env.pop("SPHERE_FAST_BENCH_SHAPES", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def results(out: Path) -> tuple[dict, str, Path]:
    folder = out / "bench" / "results"
    (json_path,) = folder.glob("*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text(), json_path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The one full dry run, with a CUDA build that fails (as it may on a GPU machine)."""
    out = tmp_path_factory.mktemp("out")
    proc = run_script(out, tmp_path_factory.mktemp("work"), "all", "--dry-run", GPU_CHECK_FAIL_BUILD="1")
    return out, proc


def test_dry_run_fails_only_the_build_and_says_so(dry_run):
    out, proc = dry_run
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]  # the failed build
    assert "DRY RUN" in proc.stdout
    steps = {s["name"]: s for s in results(out)[0]["steps"]}
    assert steps["build"]["status"] == "failed"
    assert [name for name, s in steps.items() if s["status"] not in ("ok", "skipped")] == ["build"]


def test_outputs_fit_what_comes_back_from_a_gpu_machine(dry_run):
    out, _ = dry_run
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert all(len(p.parts) <= 3 for p in files), files  # $OUT/a/b/file at most
    data, _, json_path = results(out)
    stem = json_path.stem
    assert stem.startswith("cpu-gpu-check-dry-run-")
    assert {str(p) for p in files} == {"gpu-check-logs.tar.gz", f"bench/results/{stem}.json",
                                       f"bench/results/{stem}.md", f"bench/results/{stem}-e2e.png"}
    assert (out / "bench" / "results" / f"{stem}-e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_records_environment_and_every_step(dry_run):
    out, _ = dry_run
    data, _, _ = results(out)
    assert data["format"] == "sphere_fast-gpu-check/1" and data["dry_run"] is True and data["mode"] == "all"
    env = data["environment"]
    for key in ("date", "commit", "torch", "triton", "torch_cuda", "device", "python"):
        assert key in env, key
    assert env["device"] == "cpu" and env["commit"]["id"]
    steps = {s["name"]: s for s in data["steps"]}
    assert tuple(steps) == ALL_STEPS
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped" and "CUDA device" in steps[name]["note"]
    # What a failed build must leave working: accuracy, the Triton kernels, the benchmarks, e2e.
    for name in ("probe", "accuracy", "bench-projection", "bench-real", "e2e"):
        assert steps[name]["status"] == "ok", steps[name]


def test_accuracy_step_checked_the_contract(dry_run):
    out, _ = dry_run
    acc = results(out)[0]["accuracy"]
    assert acc["ok"] and acc["oracle"]["ok"]
    assert acc["gram_backend"] == "triton"  # the Triton kernels ran, under the interpreter
    assert [(c["dtype"], c["spectrum"]) for c in acc["cases"]] == [
        ("float32", "decaying"), ("float32", "steep"), ("bfloat16", "decaying")]
    for case in acc["cases"]:
        names = [row["name"] for row in case["checks"]]
        for prefix in ("Gram", "eigensolver cold", "eigensolver warm", "projection fit", "projection refit", "energy"):
            assert any(n.startswith(prefix) for n in names), (prefix, names)
        assert all(row["ok"] for row in case["checks"])
        bounded = [row for row in case["checks"] if row["bound"] is not None]
        assert all(row["value"] <= row["bound"] for row in bounded)


def test_projection_benchmark_has_the_reference_in_the_same_run(dry_run):
    out, _ = dry_run
    benches = results(out)[0]["benchmarks"]["projection"]["benchmarks"]
    cases = {}
    for b in benches:
        info = b["extra_info"]
        assert info["kind"] == "projection" and b["stats"]["median"] > 0
        cases.setdefault(info["spectrum"], set()).add(info["case"])
    assert cases["decaying"] == {"reference", "sparse_projection", "fit_apply", "refit_apply", "fit_apply_next"}
    assert cases["steep"] == cases["decaying"] - {"reference"}  # the reference runs once per shape
    reference = [b for b in benches if b["extra_info"]["case"] == "reference"]
    assert len(reference) == 1 and reference[0]["stats"]["rounds"] == 3


def test_end_to_end_batches_cover_every_path(dry_run):
    out, _ = dry_run
    e2e = results(out)[0]["e2e"]
    assert e2e["tiny"] and [b["path"] for b in e2e["batches"]] == ["fit", "refit", "overlap", "reference"]
    for batch in e2e["batches"]:
        parts = batch["components"]
        assert set(parts) == {"targets", "keys", "solve", "sphere", "update", "other"}
        assert all(v >= 0 for k, v in parts.items() if k != "other") and parts["targets"] > 0 and parts["sphere"] > 0
        # The timed parts lie inside the batch: the untimed rest is >= 0 up to the rounding of float sums of
        # at most 64 (exact) clock differences.
        assert parts["other"] >= -64 * 2.0**-53 * (batch["batch"] + batch["one_time_stats"])
        if batch["path"] == "overlap":  # fits on the Editor's background thread, timers unsynchronised
            assert batch["timers"] == "unsynchronised" and batch["sphere_split"] == {"fit": None, "apply": None}
        else:
            assert batch["sphere_split"]["fit"] + batch["sphere_split"]["apply"] <= parts["sphere"] * (1 + 1e-6)
        assert len(batch["layers"]) == 5 and all(layer["rank"] >= 1 for layer in batch["layers"].values())
    methods = {b["path"]: b["methods"] for b in e2e["batches"]}
    assert methods["reference"] == ["reference"] and "reference" not in methods["refit"]
    assert e2e["batches"][0]["one_time_stats"] > 0  # C0 and the null-space projectors, first batch only
    summary = e2e["summary"]
    overlap = summary["overlap"]
    assert overlap["batch_seconds"] == e2e["batches"][2]["batch"] > 0 and 0 <= overlap["sphere_share_estimate"] < 1
    assert set(summary["cost_ranking_refit"]) == set(e2e["batches"][0]["components"])
    dd = e2e["alphaedit_dd"]
    assert dd["nullspace_eigh"]["seconds"] > 0 and dd["solve"]["seconds"] > 0
    assert dd["nullspace_package"]["relative_difference"] < 1e-6  # both solvers give the same projector


def test_markdown_has_every_section_and_well_formed_tables(dry_run):
    out, _ = dry_run
    _, md, _ = results(out)
    for heading in ("## Steps", "## Accuracy against float64", "### Projection: reference vs sphere_fast",
                    "## End-to-end batches"):
        assert heading in md
    for block in md.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            widths = {line.replace("\\|", "").count("|") for line in rows}
            assert len(widths) == 1, block  # an unescaped bar inside a cell would shift the columns


def test_apply_table_pairs_the_extension_with_torch():
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    def bench(case, dtype, r, seconds):
        return {"stats": {"median": seconds}, "extra_info": {
            "kind": "apply", "case": case, "model": "llama3-8b", "shape": [4096, 14336], "dtype": dtype, "r": r,
            "peak_extra_bytes": 3 * 2**20}}

    benches = [bench("cuda", "bf16", 778, 0.002), bench("torch", "bf16", 778, 0.010), bench("cuda", "fp32", 12, 0.004)]
    (section,) = [s for s in report.benchmark_sections(benches) if "Fused update" in s]
    rows = [line for line in section.splitlines() if line.startswith("| llama3-8b")]
    assert rows == ["| llama3-8b | 4096×14336 | bf16 | 778 | 2.000 | 10.000 | 5.00 | 3 |",
                    "| llama3-8b | 4096×14336 | fp32 | 12 | 4.000 | – | – | 3 |"]


def test_logs_tarball_holds_each_step(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "gpu-check-logs.tar.gz") as tar:
        names = set(tar.getnames())
    for name in ("probe", "build", "accuracy", "bench-projection", "bench-real", "e2e", "report"):
        assert f"./logs/{name}.log" in names
    assert "./steps.tsv" in names and "./accuracy.json" in names and "./e2e.json" in names


def test_a_spent_budget_skips_steps_but_still_reports(tmp_path):
    out = tmp_path / "out"
    proc = run_script(out, tmp_path, "part1", "--dry-run", GPU_CHECK_BUDGET_S="30", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    data, md, json_path = results(out)
    assert json_path.stem.endswith("-part1")
    statuses = {s["name"]: (s["status"], s["note"]) for s in data["steps"]}
    assert statuses["probe"][0] == "skipped" and "budget spent" in statuses["probe"][1]
    assert statuses["accuracy"][0] == "skipped" and "budget" in statuses["accuracy"][1]
    assert "## Steps" in md


def test_a_step_that_times_out_is_recorded_and_the_run_fails(tmp_path):
    out = tmp_path / "out"
    proc = run_script(out, tmp_path, "part1", "--dry-run", GPU_CHECK_TIMEOUT_ACCURACY="1", timeout=300)
    assert proc.returncode == 1
    data, _, _ = results(out)
    statuses = {s["name"]: s for s in data["steps"]}
    assert statuses["probe"]["status"] == "ok"
    assert statuses["accuracy"]["status"] == "timeout" and statuses["accuracy"]["timeout"] == 1
    assert statuses["tests"]["status"] == "skipped"  # the steps after it still ran their course


def plan(*args: str, **env_extra: str) -> tuple[list[dict], int]:
    """``--plan``'s rows (step, estimate, timeout, ends by, fits) and the seconds the steps may use."""
    env = dict(os.environ, **env_extra)
    env.pop("OUT", None)  # --plan needs none and writes nothing
    proc = subprocess.run(["bash", str(SCRIPT), *args, "--plan"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    budget, reserve = map(int, re.search(r"budget (\d+)s, (\d+)s of it kept", header).groups())
    rows = []
    for line in lines:
        name, runs, estimate, timeout, ends, fits = line.split(maxsplit=5)
        rows.append({"name": name, "runs": runs, "estimate": int(estimate[:-1]), "timeout": int(timeout[:-1]),
                     "ends": int(ends[:-1]), "fits": fits == "fits"})
    return rows, budget - reserve


def test_the_plan_fits_what_matters_into_the_budget():
    rows, usable = plan("all")
    names = [r["name"] for r in rows]
    # Correctness before speed; the kernel and projection benchmarks one model shape per step.
    assert names[:5] == ["install", "probe", "build", "accuracy", "tests"]
    assert set(names) == {"install", "probe", "build", "accuracy", "tests", "bench-cuda", "e2e", "bench-real",
                          "bench-kernels-llama3-8b", "bench-kernels-qwen2.5-32b", "bench-projection-llama3-8b",
                          "bench-projection-qwen2.5-7b", "bench-projection-qwen2.5-32b"}
    assert usable == 540 - 25
    ends = 0
    for row in rows:
        ends += row["estimate"]
        assert row["ends"] == ends and row["fits"] == (ends <= usable), row
        assert 0 < row["estimate"] <= row["timeout"], row
    fitting = [r["name"] for r in rows if r["fits"]]
    assert fitting == names[: len(fitting)]  # the tail is what the budget may skip
    assert {"tests", "bench-cuda", "bench-kernels-llama3-8b", "bench-projection-llama3-8b"} <= set(fitting)
    # Each half fits whole.
    for half in ("part1", "part2"):
        rows, _ = plan(half)
        assert all(r["fits"] for r in rows), rows


def test_the_plan_follows_the_budget_and_timeout_overrides():
    rows, usable = plan("all", GPU_CHECK_BUDGET_S="200", GPU_CHECK_TIMEOUT_TESTS="123")
    assert usable == 200 - 25
    assert [r["name"] for r in rows if r["fits"]] == ["install", "probe", "build", "accuracy"]
    assert next(r for r in rows if r["name"] == "tests")["timeout"] == 123
    rows, _ = plan("e2e")
    assert [r["name"] for r in rows] == ["install", "probe", "build", "e2e"]


def test_bad_arguments_are_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "part3"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OUT="/nonexistent-never-written"))
    assert proc.returncode == 2 and "unknown argument 'part3'" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "OUT"})
    assert proc.returncode != 0 and "set OUT" in proc.stderr


def test_report_reads_the_committed_cpu_projection_results():
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    data = json.loads((ROOT / "bench" / "results" / "cpu-projection-2026-11-21.json").read_text())
    table = report.projection_table(report.collect(data))
    # group cpu 2048x7168 steep: reference 30.945 s, fit+apply 0.335 s -> 92.4x (as in the README)
    row = next(line for line in table.splitlines() if "2048×7168 | steep" in line)
    assert "| 10 |" in row and "30.945" in row and "92.4" in row
