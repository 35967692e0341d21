"""Editing on the CPU with a real model (SmolLM2-135M-Instruct): key statistics and one batch's time split.

Measures, with the SmolLM2 settings of issue 11 (AlphaEdit + SPHERE, layers 3-7,
v_loss_layer 29, 25 steps, v_lr 0.1, clamp 0.75, weight decay 0.5, KL 0.0625,
L2 10, null-space threshold 2e-2):

* key statistics C0 over the first ``--stats-lines`` WikiText-2 test lines, in
  tokens per second (``--whole-corpus`` also times the whole test file);
* the context templates;
* one batch of ``--requests`` CounterFact edit-split requests, split as the
  Editor reports it: targets (z optimisation), keys (keys and layer outputs of
  every edited layer), solve, sphere, apply, cache (AlphaEdit's cache_c).

Each run appends to ``bench/results/cpu-editing-<date>.json`` under ``--label``
and rewrites the matching ``.md``. To compare code versions, run the script
with each on ``PYTHONPATH`` back to back (the CPU may be shared: the load
average before and after each run is recorded). It also records each request's
target NLL and z residual, so two runs can be checked for equal results.

The model comes from ``sphere_fast.harness.model_sources.cached_model("smollm2")``
when that exists, else from the GGUF file named by ``SPHERE_FAST_SMOLLM2_GGUF``
(needs the ``gguf`` package), or from ``--model-dir`` (a Hugging Face directory).
Without any of them the run is skipped with the reason.

    python bench/bench_editing_cpu.py --label after
    PYTHONPATH=<other checkout> python bench/bench_editing_cpu.py --label before --commit <hash>

Under pytest (``python -m pytest bench/bench_editing_cpu.py``) a reduced run
(20 lines, 2 requests, 3 steps) is timed with pytest-benchmark.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sphere_fast.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SPLIT = ("targets", "keys", "solve", "sphere", "apply", "cache", "stats", "total")


class Unavailable(Exception):
    """The model cannot be had here; the message says why."""


def smollm2_settings(n_stats_lines: int, steps: int = 25):
    from sphere_fast.editing.hparams import load_hparams

    return load_hparams("SPHERE/llama3-8b", layers=[3, 4, 5, 6, 7], v_loss_layer=29, v_num_grad_steps=steps,
                        v_lr=0.1, clamp_norm_factor=0.75, v_weight_decay=0.5, kl_factor=0.0625, L2=10,
                        nullspace_threshold=2e-2, mom2_n_samples=n_stats_lines, mom2_dtype="float32")


def load_smollm2(model_dir: str | None = None):
    """(model, tokenizer, where it came from) or raise Unavailable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reasons = []
    if model_dir:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return model.eval(), tok, f"directory {model_dir}"
    try:
        from sphere_fast.harness.model_sources import cached_model
    except ImportError as exc:
        reasons.append(f"sphere_fast.harness.model_sources is not available ({exc})")
    else:
        try:
            found = cached_model("smollm2")
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next source
            found = None
            reasons.append(f"cached_model('smollm2') failed: {type(exc).__name__}: {exc}")
        if isinstance(found, (str, Path)):
            tok = AutoTokenizer.from_pretrained(found)
            model = AutoModelForCausalLM.from_pretrained(found, dtype=torch.float32)
            return model.eval(), tok, f"cached_model('smollm2') -> {found}"
        if isinstance(found, tuple) and len(found) >= 2:
            return found[0].float().eval(), found[1], "cached_model('smollm2')"
        if found is None and not reasons:
            reasons.append("cached_model('smollm2') found nothing")
    gguf = os.environ.get("SPHERE_FAST_SMOLLM2_GGUF")
    if gguf and Path(gguf).is_file():
        folder, name = str(Path(gguf).parent), Path(gguf).name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), tok, f"GGUF {gguf}"
    reasons.append("SPHERE_FAST_SMOLLM2_GGUF is " + (f"{gguf!r}, not a file" if gguf else "not set"))
    raise Unavailable("SmolLM2-135M not available: " + "; ".join(reasons))


def count_tokens(tok, texts, max_length: int) -> int:
    return sum(len(ids) for ids in tok(list(texts), truncation=True, max_length=max_length)["input_ids"])


def time_key_statistics(model, tok, names, corpus: Path, n_lines: int, cache_dir: Path) -> dict:
    """C0 of every edited layer from the first ``n_lines`` lines (computed: the cache folder is empty)."""
    from sphere_fast.editing import covariance

    max_length = int(min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048))
    texts = covariance.read_corpus(corpus, n_lines)
    tokens = count_tokens(tok, texts, max_length)
    t = time.perf_counter()
    covariance.layer_second_moments(model, tok, names, corpus=corpus, n_samples=n_lines, dtype="float32",
                                    cache_dir=cache_dir, max_length=max_length, progress=False)
    seconds = time.perf_counter() - t
    return {"lines": len(texts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run(model, tok, *, n_stats_lines: int, n_requests: int, steps: int = 25, whole_corpus: bool = False) -> dict:
    from sphere_fast.editing import paths
    from sphere_fast.harness.datasets import load_requests
    from sphere_fast.editing.editor import Editor

    hp = smollm2_settings(n_stats_lines, steps)
    names = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    corpus = paths.wikitext_path("test")
    requests = load_requests(paths.counterfact_path(), limit=n_requests)
    out: dict = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        out["key_statistics"] = time_key_statistics(model, tok, names, corpus, n_stats_lines, Path(tmp) / "c")
        editor = Editor(model, tok, hp, method="alphaedit", sphere=True, stats_corpus=corpus,
                        cache_dir=Path(tmp) / "c", seed=0, progress=False)
        t = time.perf_counter()
        editor.templates  # noqa: B018 - sampled once per model, shared by every batch
        out["templates_seconds"] = time.perf_counter() - t
        info = editor.edit_batch(requests)
        if whole_corpus:  # last, so that the parts above run back to back with another version's run
            out["key_statistics_whole_test_file"] = time_key_statistics(model, tok, names, corpus, 10 ** 9,
                                                                        Path(tmp) / "whole")
    out["batch"] = {
        "requests": len(requests),
        "seconds": {k: info["seconds"].get(k, 0.0) for k in SPLIT},
        "target_nll_before": info["target_nll_before"],
        "target_nll_after": info["target_nll_after"],
        "z_residual_before": info["z_residual_before"],
        "z_residual_after": info["z_residual_after"],
    }
    out["load_average_after"] = os.getloadavg()
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _markdown(doc: dict) -> str:
    runs = doc["runs"]
    labels = list(runs)
    lines = [f"# CPU results: editing SmolLM2-135M-Instruct ({doc['date']})", ""]
    lines.append(f"- device: {doc['device']}")
    for label in labels:
        r = runs[label]
        lines.append(f"- `{label}`: code at commit {r['commit']} ({r['sphere_fast_path']}), torch {r['torch']}, "
                     f"{r['threads']} threads, load average {r['load_average_before'][0]:.1f} before, "
                     f"{r['load_average_after'][0]:.1f} after; model from {r['model_source']}")
    lines.append(f"- settings: {doc['settings']}")
    lines += ["", "| measure | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]

    def row(name, get, fmt):
        cells = []
        for label in labels:
            try:
                cells.append(fmt(get(runs[label])))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    ks = "key_statistics"
    row("key statistics: lines", lambda r: r[ks]["lines"], str)
    row("key statistics: tokens", lambda r: r[ks]["tokens"], str)
    row("key statistics: s", lambda r: r[ks]["seconds"], "{:.1f}".format)
    row("key statistics: tokens/s", lambda r: r[ks]["tokens_per_s"], "{:.0f}".format)
    whole = "key_statistics_whole_test_file"
    row("whole WikiText-2 test: tokens", lambda r: r[whole]["tokens"], str)
    row("whole WikiText-2 test: s", lambda r: r[whole]["seconds"], "{:.1f}".format)
    row("whole WikiText-2 test: tokens/s", lambda r: r[whole]["tokens_per_s"], "{:.0f}".format)
    row("context templates: s", lambda r: r["templates_seconds"], "{:.1f}".format)
    row("batch: requests", lambda r: r["batch"]["requests"], str)
    for part in SPLIT:
        row(f"batch: {part} s", lambda r, part=part: r["batch"]["seconds"][part], "{:.2f}".format)
    row("z residual before → after", lambda r: (r["batch"]["z_residual_before"], r["batch"]["z_residual_after"]),
        lambda v: f"{v[0]:.3f} → {v[1]:.3f}")
    if doc.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    finals = [runs[label]["batch"]["target_nll_after"] for label in labels if "batch" in runs[label]]
    if len(finals) >= 2 and len({len(f) for f in finals}) == 1:
        spread = max(max(values) - min(values) for values in zip(*finals))
        lines += ["", f"Largest spread of a request's final target NLL across the runs: {spread:.2e}."]
    return "\n".join(lines) + "\n"


def write_results(label: str, result: dict, date: str, settings: str) -> tuple[Path, Path]:
    """Add ``result`` as run ``label`` to the day's JSON (atomically) and rewrite its Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"cpu-editing-{date}.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"date": date, "runs": {}}
    doc.update(device=f"{_cpu_name()}, {os.cpu_count()} cores visible", settings=settings)
    doc["runs"][label] = result
    for path, text in ((json_path, json.dumps(doc, indent=2) + "\n"), (json_path.with_suffix(".md"), _markdown(doc))):
        atomic_write_text(path, text)
    return json_path, json_path.with_suffix(".md")


SETTINGS_TEXT = ("AlphaEdit + SPHERE, layers 3-7, v_loss_layer 29, {steps} steps, v_lr 0.1, clamp 0.75, "
                 "weight decay 0.5, KL 0.0625, L2 10, threshold 2e-2; first {requests} requests of "
                 "easyedit_counterfact-edit.json as one batch; C0 from the first {lines} WikiText-2 test lines")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="name of this run in the results (e.g. before, after)")
    parser.add_argument("--stats-lines", type=int, default=300)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--whole-corpus", action="store_true", help="also time C0 over the whole WikiText-2 test file")
    parser.add_argument("--model-dir", help="a Hugging Face directory holding SmolLM2-135M (instead of the cache)")
    parser.add_argument("--commit", help="commit of the code measured (default: this checkout's HEAD)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--date", default=_dt.date.today().isoformat())
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, source = load_smollm2(args.model_dir)
    except Unavailable as exc:
        print(f"skipped: {exc}")
        return 0
    import sphere_fast

    result = run(model, tok, n_stats_lines=args.stats_lines, n_requests=args.requests, steps=args.steps,
                 whole_corpus=args.whole_corpus)
    result.update(commit=args.commit or _git_commit(), sphere_fast_path=str(Path(sphere_fast.__file__).parent),
                  torch=torch.__version__, threads=torch.get_num_threads(), model_source=source)
    settings = SETTINGS_TEXT.format(steps=args.steps, requests=args.requests, lines=args.stats_lines)
    for path in write_results(args.label, result, args.date, settings):
        print(f"wrote {path}")
    print(json.dumps({k: result[k] for k in ("key_statistics", "templates_seconds")}, indent=1))
    print(json.dumps(result["batch"]["seconds"], indent=1))
    return 0


def test_editing_cpu(benchmark):
    """A reduced run (20 lines, 2 requests, 3 steps), timed once; skipped without the model."""
    import pytest

    try:
        model, tok, _ = load_smollm2()
    except Unavailable as exc:
        pytest.skip(str(exc))
    result = benchmark.pedantic(run, args=(model, tok), kwargs=dict(n_stats_lines=20, n_requests=2, steps=3),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(key_statistics_tokens_per_s=result["key_statistics"]["tokens_per_s"],
                                **{f"batch_{k}_s": v for k, v in result["batch"]["seconds"].items()})


if __name__ == "__main__":
    sys.exit(main())
