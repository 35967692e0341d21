"""sphere-fast: SPHERE's projection benchmarked, and sequential editing with it.

bench-projection   time the reference projection against sphere_fast on one layer
edit               sequentially edit a model with MEMIT, AlphaEdit, RECT, PRUNE or FT (+ SPHERE), with metrics
train-lm           train (or reuse) the small WikiText-2 Llama model used by tests and the demo
demo               one method (AlphaEdit by default) with and without SPHERE on a real model (smollm2), compared
study              several methods over thousands of sequential edits, resumable, then a report
models             the named models and the converted models in the cache

``--model`` takes a local Hugging Face directory, a ``.gguf`` file or a named
model (``smollm2``); see :mod:`sphere_fast.harness.model_sources`.

This module is the whole command line and a thin layer over
:mod:`sphere_fast.harness`: it parses arguments, calls the harness, prints, and
turns the library's errors into ``sphere-fast <command>: error: <message>``
(exit status 1; argparse's own errors exit with 2). The heavy imports (torch,
transformers, the editor) happen inside the handlers.

``edit`` writes into ``--out`` the files of
:func:`sphere_fast.harness.running.run_edit` (``edits.csv``, ``edits.png``,
``metrics/``, ``summary.json``, ``checkpoints/``), plus ``run.json`` (the
run's settings, checked on ``--resume``: :func:`~sphere_fast.harness.running.record_run`)
and, with ``--save-model DIR``, the edited model as a Hugging Face directory.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

METHOD_NAMES = ("memit", "alphaedit", "rect", "prune", "ft")  # editing.methods.METHODS, without importing torch
MODEL_HELP = "local Hugging Face directory, .gguf file, or named model (see `sphere-fast models`)"


class CLIError(SystemExit):
    """A user error: printed as ``sphere-fast <command>: error: <message>``, exit status 1."""

    def __init__(self, command: str, message: str):
        super().__init__(f"sphere-fast {command}: error: {message}")
        self.message = message


@contextlib.contextmanager
def _user_errors(command: str, errors, message=str):
    """Inside the block, ``errors`` become a CLIError saying ``message(exc)``."""
    try:
        yield
    except errors as exc:
        raise CLIError(command, message(exc)) from None


def _quiet_transformers() -> None:
    """No progress bars from transformers either (weight loading; downloads through huggingface_hub)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


# --------------------------------------------------------------------------- bench-projection


def cmd_bench_projection(args) -> int:
    from .harness.bench_projection import bench_projection

    result = bench_projection(shape=args.shape, spectrum=args.spectrum, dtype=args.dtype, eta=args.eta,
                              alpha=args.alpha, device=_device(args.device, "bench-projection"), seed=args.seed,
                              reference=not args.skip_reference, error=not args.skip_error)
    print(f"  sphere_fast sparse_projection  {result['seconds']:9.3f} s   (fit alone {result['fit_seconds']:.3f} s)  "
          f"r = {result['rank']}")
    if "reference_seconds" in result:
        print(f"  reference sparse_projection    {result['reference_seconds']:9.3f} s   r = {result['reference_rank']}")
        print(f"  speed-up                       {result['reference_seconds'] / result['seconds']:9.1f} x")
    if "error" in result:
        print(f"  float64 rank {result['float64_rank']} (trace {result['float64_trace']:.6f}); "
              f"||B_proj - B_proj_fp64|| / ||B|| = {result['error']:.2e}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _checked(name: str):
    """An argparse type for ``name`` (eta, alpha): a number passing the library's own range check."""
    def parse(text: str) -> float:
        from . import _validation  # here: the parser itself does not import torch

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return getattr(_validation, f"check_{name}")(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


# --------------------------------------------------------------------------- edit


def _device(name: str | None, command: str):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(command, f"--device {name!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(command, f"--device {name}: CUDA is not available on this machine")
    return dev


def _note(command: str):
    return lambda message: print(f"sphere-fast {command}: {message}", file=sys.stderr, flush=True)


def _resolve_model(spec: str | Path, command: str = "edit", flag: str = "--model") -> Path:
    """The Hugging Face directory for ``--model`` (fetched and converted once if needed), or a CLIError."""
    from .harness.model_sources import ModelSourceError, resolve_model

    with _user_errors(command, ModelSourceError, lambda exc: f"{flag} {exc.spec!r}: {exc.reason}"):
        return resolve_model(spec, log=_note(command))


def _load_model(spec: str | Path, *, device=None, dtype: str = "float32", command: str = "edit"):
    """``(model, tokenizer)`` for ``--model``, with the model source's errors as CLIErrors."""
    from .harness.model_sources import ModelSourceError, load_model

    with _user_errors(command, ModelSourceError, lambda exc: f"--model {exc.spec!r}: {exc.reason}"):
        return load_model(spec, device=device, dtype=dtype, log=_note(command))


def _check_save_model(path: str | None, command: str) -> Path | None:
    from .harness.model_sources import check_save_dir

    if path is None:
        return None
    with _user_errors(command, ValueError, lambda exc: f"--save-model: {exc}"):
        return check_save_dir(path)


def _save_edited_model(model, tokenizer, path: Path, source: dict, command: str) -> None:
    from .harness.model_sources import save_model

    with _user_errors(command, ValueError, lambda exc: f"--save-model: {exc}"):
        save_model(model, tokenizer, path, source=source)
    print(f"wrote the edited model to {path}")


def _load_hparams(source: str, method: str, command: str):
    from .harness.running import choose_hparams

    with _user_errors(command, (FileNotFoundError, ValueError), lambda exc: f"--hparams {source!r}: {exc}"):
        return choose_hparams(None, method, source=source)


def _shipped_hparams(args, model_path: Path) -> str | None:
    """The shipped settings of ``--model`` (a named model, by name or converted directory) for
    ``--method`` and ``--sphere``, or None."""
    from .harness.model_sources import named_model
    from .harness.running import hparams_source

    return hparams_source(args.method, sphere=args.sphere, model_name=named_model(args.model, model_path))


def cmd_edit(args) -> int:
    from .harness.datasets import DatasetError, load_requests
    from .harness.running import metric_line, record_run, run_edit

    command = "edit"
    data = Path(args.data)
    if not data.exists():
        raise CLIError(command, f"--data {str(data)!r}: file not found")
    if args.stats_corpus is not None and not Path(args.stats_corpus).exists():
        raise CLIError(command, f"--stats-corpus {args.stats_corpus!r}: file not found")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(command, f"--out {str(out)!r} exists and is not a directory")
    if not args.resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise CLIError(command, f"--out {str(out)!r} already holds checkpoints: pass --resume or choose another --out")
    save_dir = _check_save_model(args.save_model, command)

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _user_errors(command, DatasetError, lambda exc: f"--data: {exc}"):
            requests = load_requests(data, limit=args.edits, schema=args.schema, invalid="skip")
    for w in caught:
        print(f"sphere-fast edit: note: {w.message}", file=sys.stderr)
    if len(requests) < args.edits:
        raise CLIError(command, f"--edits {args.edits}: {data} holds only {len(requests)} editable requests")

    # A given --hparams is read before the model is fetched; without one the model's shipped settings,
    # else None: run_edit sizes them to the model.
    hparams = None if args.hparams is None else _load_hparams(args.hparams, args.method, command)
    hparams_source = args.hparams
    model_path = _resolve_model(args.model, command)
    if hparams is None:
        hparams_source = _shipped_hparams(args, model_path)
        if hparams_source is not None:
            hparams = _load_hparams(hparams_source, args.method, command)
            _note(command)(f"note: the shipped settings {hparams_source} (pass --hparams to choose others)")
    settings = {"model": str(model_path.resolve()), "data": str(data.resolve()), "method": args.method,
                "sphere": args.sphere, "eta": args.eta, "alpha": args.alpha, "edits": args.edits,
                "batch_size": args.batch_size, "hparams": hparams_source, "seed": args.seed, "schema": args.schema,
                "eval_every": args.eval_every, "stats_corpus": args.stats_corpus, "dtype": args.dtype}
    with _user_errors(command, ValueError, lambda exc: f"--resume: {exc}"):
        record_run(out, settings, resume=args.resume, log=lambda message: _note(command)(f"note: --resume: {message}"))

    import torch

    torch.manual_seed(args.seed)
    if args.quiet:
        _quiet_transformers()
    device = _device(args.device, command)
    model, tokenizer = _load_model(model_path, device=device, dtype=args.dtype, command=command)
    with _user_errors(command, FileNotFoundError):
        summary = run_edit(
            model=model, tokenizer=tokenizer, requests=requests, method=args.method, sphere=args.sphere, out=out,
            batch_size=args.batch_size, eval_every=args.eval_every, hparams=hparams, eta=args.eta, alpha=args.alpha,
            stats_corpus=args.stats_corpus, overlap_sphere_fit=args.overlap_sphere_fit, resume=args.resume,
            keep_checkpoints=args.keep_checkpoints, seed=args.seed, eval_batch_size=args.eval_batch_size,
            fluency=args.fluency, progress=not args.quiet, run_info={"settings": settings},
            title=f"{args.method}{' + SPHERE' if args.sphere else ''}",
        )
    print(f"done: {summary['edits']} edits in {summary['batches']} batches; after: {metric_line(summary['after'])}")
    print(f"mean energy drift {_mean(summary['energy_drift'].values()):+.4%}; "
          f"edit time {summary['edit_seconds']:.1f} s, SPHERE share "
          + (f"{summary['sphere_share']:.1%}" if summary["sphere_share"] is not None else "-"))
    print(f"wrote {out / 'edits.csv'}, {out / 'edits.png'}, {out / 'summary.json'}, {out / 'metrics'}/")
    if save_dir is not None:
        _save_edited_model(model, tokenizer, save_dir, {"kind": "edited", "base_model": settings["model"],
                                                      "method": args.method, "sphere": args.sphere,
                                                      "edits": args.edits, "data": settings["data"]}, command)
    return 0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- train-lm


def cmd_train_lm(args) -> int:
    import shutil

    from .harness import train_lm

    command = "train-lm"
    device = _device(args.device, command)
    if args.quiet:
        _quiet_transformers()
    cfg = train_lm.PRESETS[args.preset] if args.preset else train_lm.default_config(device)
    overrides = {k: getattr(args, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                               "intermediate_size", "seq_len", "batch_size", "steps", "lr", "seed")
                 if getattr(args, k) is not None}
    with _user_errors(command, (ValueError, FileNotFoundError)):
        cfg = cfg.replace(**overrides)
        path, info, reused = train_lm.ensure_model(cfg, device=device, progress=not args.quiet, force=args.force)
    print(("reused cached model " if reused else "trained model ") + str(path))
    print(f"  parameters {info['parameters']:,}, train tokens {info['train_tokens']:,}, "
          f"held-out perplexity {info['heldout_perplexity']:.2f} on {info['heldout_tokens']:,} tokens, "
          f"training took {info['seconds']['total']:.0f} s on {info['device']}")
    if args.out:
        dest = Path(args.out)
        if dest.exists() and any(dest.iterdir()):
            raise CLIError(command, f"--out {str(dest)!r} exists and is not empty")
        shutil.copytree(path, dest, dirs_exist_ok=True)
        print(f"  copied to {dest}")
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from .harness.demo import DEFAULT_MODEL, TRAINED_MODEL, run_demo

    command = "demo"
    device = _device(args.device, command)
    if args.hparams is not None and not Path(args.hparams).exists():
        raise CLIError(command, f"--hparams {args.hparams!r}: file not found")
    save_dir = _check_save_model(args.save_model, command)
    if args.quiet:
        _quiet_transformers()
    model = args.model or DEFAULT_MODEL
    if model != TRAINED_MODEL:
        model = _resolve_model(model, command)
    run_demo(model=model, method=args.method, edits=args.edits, batch_size=args.batch_size, out=args.out, device=device, seed=args.seed,
             synthetic=args.synthetic, progress=not args.quiet, hparams_file=args.hparams, save_model_dir=save_dir)
    return 0


# --------------------------------------------------------------------------- models


def cmd_study(args) -> int:
    from .harness.study import default_jobs, pending_runs, run_study, set_threads
    from .harness.study_report import write_report
    from .harness.study_spec import StudySpecError, load_spec, shipped_spec

    command = "study"
    if args.report is not None:
        report = Path(args.report)
        if not (report / "spec.json").exists():
            raise CLIError(command, f"--report {str(report)!r}: no study there (spec.json missing)")
        written = write_report(report)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    if args.out is None:
        raise CLIError(command, "--out is required (or --report DIR)")
    source = args.spec or shipped_spec()
    overrides = {"model": args.model, "data": args.data, "horizon": args.horizon, "batch_size": args.batch_size}
    with _user_errors(command, StudySpecError):
        spec = load_spec(source, **overrides)
    out = Path(args.out)
    if args.pilot_tasks:
        set_threads(args.threads)
        return _pilot_tasks(spec, out)
    runs = pending_runs(spec, out, args.only)
    jobs = args.jobs if args.jobs is not None else default_jobs(len(runs), os.cpu_count(), _cuda_available())
    with _user_errors(command, StudySpecError):
        if jobs > 1 and len(runs) > 1:
            _study_jobs(args, spec, out, runs, jobs)
        else:
            set_threads(args.threads)
            statuses = run_study(spec, out, budget_minutes=args.budget_minutes, only=args.only,
                                 log=lambda m: print(m, flush=True))
            for name, status in statuses.items():
                print(f"{name}: {status['state']} at {status['edits']} edits")
    written = write_report(out)
    print("report: " + ", ".join(str(p) for p in written))
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _pilot_tasks(spec, out: Path) -> int:
    from .harness.general_tasks import pilot
    from .harness.report import write_json

    model, tokenizer = _load_model(spec.model, dtype=spec.dtype, command="study")
    result = pilot(model, tokenizer, seed=spec.seed, log=lambda m: print(m, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "general_tasks_pilot.json", {"model": spec.model, "tasks": result})
    print(f"wrote {out / 'general_tasks_pilot.json'}")
    return 0


def _study_jobs(args, spec, out: Path, runs: list[str], jobs: int) -> None:
    """The runs left in ``jobs`` processes of cores / jobs threads each, after the shared baseline here.

    The baseline runs alone, so it gets the cores the workers will share (jobs x threads)."""
    import subprocess

    from .harness.study import run_study, set_threads

    threads = args.threads or max(1, (os.cpu_count() or 2) // jobs)
    set_threads(threads * jobs)
    run_study(spec, out, budget_minutes=0, only=runs[:1], log=lambda m: print(m, flush=True))  # baseline only
    groups = [runs[i::jobs] for i in range(jobs)]
    base = study_worker_command(args, out, threads)
    # The workers' BLAS and OpenMP pools size themselves from the environment, which set_threads filled above.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(base + ["--only", *group], cwd=out.resolve(), env=env) for group in groups if group]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise CLIError("study", f"a worker process failed (exit codes {codes})")


def study_worker_command(args, out: Path, threads: int) -> list[str]:
    """The command line of one ``--jobs`` worker, less its ``--only``. Paths are absolute, so the workers can
    start in ``out`` (a checkout root as the current folder would put its kernels/ folder on sys.path); a
    shipped spec's name becomes its file, and "data:" request paths stay as they are."""
    from .harness.study_spec import spec_path

    def absolute(value):
        return str(Path(value).resolve()) if value is not None and Path(value).exists() else value

    base = [sys.executable, "-m", "sphere_fast.cli", "study", "--out", str(out.resolve()), "--threads", str(threads),
            "--jobs", "1"]
    spec = absolute(spec_path(args.spec)) if args.spec else None
    for flag, value in (("--spec", spec), ("--model", absolute(args.model)), ("--data", absolute(args.data)),
                        ("--horizon", args.horizon), ("--batch-size", args.batch_size),
                        ("--budget-minutes", args.budget_minutes)):
        if value is not None:
            base += [flag, str(value)]
    return base


def cmd_models(args) -> int:
    from .harness.model_sources import list_models, models_dir

    for spec in args.fetch:
        path = _resolve_model(spec, "models", "--fetch")
        print(f"{spec}: {path}")
    rows = list_models(full=args.verify)
    print(f"named models (--model NAME); converted models live in {models_dir()}")
    for row in rows:
        if not row["named"]:
            continue
        state = f"cached, {row['size'] / 2**20:.0f} MiB" if row["cached"] else "not cached (fetched and converted on first use)"
        print(f"  {row['name']:<10} {row['description']}")
        print(f"  {'':<10} from {row['source']}")
        print(f"  {'':<10} {state}: {row['path']}")
    headings = {"gguf": "converted GGUF files (--model FILE.gguf):",
                "train-lm": "trained by sphere-fast train-lm (--model DIR):", "saved": "other models in the cache:"}
    for kind, heading in headings.items():
        group = [r for r in rows if not r["named"] and r.get("kind", "gguf") == kind]
        if group:
            print(heading)
        for row in group:
            state = f"{row['size'] / 2**20:.0f} MiB" if row["cached"] else "incomplete (rebuilt on next use)"
            print(f"  {row['name']}  {row['source']}, {state}: {row['path']}")
    return 0


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    from .harness.bench_projection import CPU_SHAPE, GPU_SHAPE
    from .harness.demo import CPU_SIZES, GPU_SIZES

    parser = argparse.ArgumentParser(prog="sphere-fast", description=__doc__.splitlines()[0])
    # Arguments that edit, demo and train-lm share (argparse parents).
    device_quiet = argparse.ArgumentParser(add_help=False)
    device_quiet.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    device_quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    seeded = argparse.ArgumentParser(add_help=False)
    seeded.add_argument("--seed", type=int, default=0)

    def by_device(key: str) -> str:  # the demo's default sizes, as run_demo picks them
        cpu, gpu = CPU_SIZES[key], GPU_SIZES[key]
        return f"{cpu}" if cpu == gpu else f"{cpu} on a CPU, {gpu} on a GPU"

    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench-projection", parents=[seeded],
        help="time the reference projection against sphere_fast on one layer")
    bench.add_argument("--shape", type=_positive_int, nargs=2, metavar=("N", "D"),
                       help=f"weight shape (default {' '.join(map(str, CPU_SHAPE))} on CPU, "
                            f"{' '.join(map(str, GPU_SHAPE))} on a GPU)")
    bench.add_argument("--spectrum", choices=("decaying", "steep", "gaussian"), default="decaying",
                       help="singular-value profile of the synthetic weight (see sphere_fast.synthetic)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")
    bench.add_argument("--eta", type=_checked("eta"), default=0.5)
    bench.add_argument("--alpha", type=_checked("alpha"), default=0.5)
    bench.add_argument("--device", default=None)
    bench.add_argument("--skip-reference", action="store_true", help="do not run the slow reference")
    bench.add_argument("--skip-error", action="store_true", help="do not compute the float64 error")
    bench.set_defaults(handler=cmd_bench_projection)
    edit = sub.add_parser(
        "edit", parents=[device_quiet, seeded],
        help="sequentially edit a model with MEMIT, AlphaEdit, RECT, PRUNE or FT (+ SPHERE) and record metrics",
        description="Sequential knowledge editing of a Hugging Face causal LM (a local directory, a .gguf file or "
                    "a named model), with evaluation, checkpoints, a CSV per batch and a plot.",
    )
    edit.add_argument("--model", required=True, help=MODEL_HELP)
    edit.add_argument("--data", required=True, help="CounterFact / EasyEdit / ZsRE JSON file")
    edit.add_argument("--schema", default="auto", choices=("auto", "counterfact", "easyedit", "zsre"))
    edit.add_argument("--method", required=True, choices=METHOD_NAMES,
                      help="editing method (rect and prune edit with MEMIT's update, then restrain it)")
    edit.add_argument("--sphere", action=argparse.BooleanOptionalAction, default=True,
                      help="project each update with SPHERE (default: on)")
    edit.add_argument("--eta", type=_checked("eta"), default=None, help="SPHERE cumulative ratio (default 0.5)")
    edit.add_argument("--alpha", type=_checked("alpha"), default=None,
                      help="SPHERE suppression strength (default 0.5 AlphaEdit, 0.8 MEMIT)")
    edit.add_argument("--edits", type=_positive_int, required=True, help="number of requests to edit (file order)")
    edit.add_argument("--batch-size", type=_positive_int, required=True, help="requests per sequential batch")
    edit.add_argument("--hparams", default=None,
                      help="YAML/JSON hparams file or shipped name (default: the shipped settings of a named "
                           "model for --method and --sphere, else sized to the model)")
    edit.add_argument("--stats-corpus", default=None, help="text corpus for the key covariance (default WikiText-2)")
    edit.add_argument("--overlap-sphere-fit", action="store_true",
                      help="start each layer's SPHERE fit when a batch starts, on a background thread (a side "
                           "stream on CUDA), so that it runs during target optimisation; the same edits. For a "
                           "GPU, where the fit is most of SPHERE's cost; on a CPU it shares the cores")
    edit.add_argument("--eval-every", type=_positive_int, default=1,
                      help="evaluate and checkpoint every K batches (and after the last)")
    edit.add_argument("--out", required=True, help="output directory")
    edit.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    edit.add_argument("--save-model", default=None, metavar="DIR",
                      help="write the edited model to DIR as a Hugging Face directory (DIR must be new or empty)")
    edit.add_argument("--keep-checkpoints", type=_positive_int, default=None, metavar="N",
                      help="keep only the newest N checkpoints (default: all; each holds d x d state per layer)")
    edit.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    edit.add_argument("--eval-batch-size", type=_positive_int, default=16)
    edit.add_argument("--fluency", action="store_true", help="also measure generation n-gram entropy")
    edit.set_defaults(handler=cmd_edit)

    train = sub.add_parser(
        "train-lm", parents=[device_quiet],
        help="train (or reuse) the small WikiText-2 Llama model used by tests and the demo",
        description="Train a small Llama-architecture LM and byte-level BPE tokenizer on WikiText-2, cached by "
                    "config, seed, device type and data hash under the cache directory.",
    )
    train.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default=None,
                       help="base configuration (default: gpu on CUDA, else cpu)")
    for flag, field, kind in (
        ("--vocab-size", "vocab_size", _positive_int), ("--hidden-size", "hidden_size", _positive_int),
        ("--layers", "num_layers", _positive_int), ("--heads", "num_heads", _positive_int),
        ("--intermediate-size", "intermediate_size", _positive_int), ("--seq-len", "seq_len", _positive_int),
        ("--batch-size", "batch_size", _positive_int), ("--steps", "steps", _positive_int),
        ("--lr", "lr", float), ("--seed", "seed", int),
    ):
        train.add_argument(flag, dest=field, type=kind, default=None, help=f"override the preset's {field}")
    train.add_argument("--force", action="store_true", help="retrain even if cached")
    train.add_argument("--out", default=None, help="also copy the model directory here")
    train.set_defaults(handler=cmd_train_lm)

    demo = sub.add_parser(
        "demo", parents=[device_quiet, seeded],
        help="edit CounterFact with AlphaEdit (or --method) with and without SPHERE on a real model (smollm2), "
             "compare",
    )
    demo.add_argument("--method", default="alphaedit", choices=METHOD_NAMES,
                      help="editing method, run with and without SPHERE (default alphaedit)")
    demo.add_argument("--model", default=None,
                      help=f"{MODEL_HELP}, or train-lm (the small WikiText-2 model of `sphere-fast train-lm`); "
                           "default smollm2")
    demo.add_argument("--save-model", default=None, metavar="DIR",
                      help="write the --method + SPHERE edited model to DIR as a Hugging Face directory")
    demo.add_argument("--edits", type=_positive_int, default=None,
                      help=f"edit-split requests to edit (default {by_device('edits')})")
    demo.add_argument("--batch-size", type=_positive_int, default=None,
                      help=f"edits per batch (default {by_device('batch_size')})")
    demo.add_argument("--out", default="out/demo", help="output directory (default ./out/demo)")
    demo.add_argument("--synthetic", action="store_true", help="use synthetic requests even if CounterFact is present")
    demo.add_argument("--hparams", default=None,
                      help="YAML/JSON hparams file (default: the shipped file of --method for smollm2, else sized "
                           "to the model with L2 10)")
    demo.set_defaults(handler=cmd_demo)

    study = sub.add_parser(
        "study", help="several methods over thousands of sequential edits, resumable, then a report",
        description="Run the runs of a study spec (YAML/JSON; default: the shipped SmolLM2 CounterFact study, "
                    "sphere_fast/configs/studies/smollm2-counterfact.yaml) over one request sequence, evaluating "
                    "every eval_every edits. Calling it again continues where it stopped; finished runs are kept. "
                    "Checkpoints go to the cache folder, results to --out.",
    )
    study.add_argument("--spec", default=None,
                       help="study spec file (YAML or JSON) or a shipped spec's name: smollm2-counterfact (the "
                            "default), smollm2-counterfact-methods (RECT, PRUNE, FT +- SPHERE), smollm2-zsre (MEMIT, "
                            "AlphaEdit +- SPHERE on ZsRE, 900 edits)")
    study.add_argument("--out", default=None, help="output folder (results; resumable)")
    study.add_argument("--report", default=None, metavar="DIR",
                       help="only write the report of the study in DIR, from whatever runs are finished")
    study.add_argument("--model", default=None, help=f"override the spec's model: {MODEL_HELP}")
    study.add_argument("--data", default=None, help="override the spec's request file")
    study.add_argument("--horizon", type=_positive_int, default=None, help="override the spec's number of edits")
    study.add_argument("--batch-size", type=_positive_int, default=None, help="override the spec's batch size")
    study.add_argument("--only", nargs="+", default=(), metavar="RUN", help="run only these runs of the spec")
    study.add_argument("--budget-minutes", type=float, default=None,
                       help="stop cleanly at the next checkpoint once this many minutes are spent")
    study.add_argument("--pilot-tasks", action="store_true",
                       help="only score the unedited model on the paper's four general-ability tasks (BoolQ, RTE, "
                            "NQ-open, GSM8K; a sample of each) into OUT/general_tasks_pilot.json")
    study.add_argument("--jobs", type=_positive_int, default=None,
                       help="runs in parallel processes (default: on a CPU one per core, up to the runs left, "
                            "one thread each; with a GPU 1); the shared baseline runs first, on all their threads")
    study.add_argument("--threads", type=_positive_int, default=None, help="torch threads per process")
    study.set_defaults(handler=cmd_study)

    models = sub.add_parser(
        "models", help="list the named models and the converted models in the cache",
        description="List the named models (--model NAME) and what the cache holds; --fetch converts ahead of use.",
    )
    models.add_argument("--fetch", nargs="+", default=(), metavar="MODEL",
                        help="fetch and convert these models (named models or .gguf files) now")
    models.add_argument("--verify", action="store_true",
                        help="hash every cached file (default: files with their recorded size and time are trusted)")
    models.set_defaults(handler=cmd_models)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
