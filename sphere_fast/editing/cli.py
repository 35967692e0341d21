"""``sphere-fast edit``, ``train-lm``, ``demo`` and ``models``: the editing layer on the command line.

``--model`` takes a local Hugging Face directory, a ``.gguf`` file or a named
model (``smollm2``); see :mod:`.model_sources`.

:func:`register` adds the subcommands to the top-level parser; the heavy
imports (torch, transformers, the editor) happen inside the handlers.

``edit`` writes into ``--out``::

    run.json                      the run's settings (checked on --resume)
    metrics/batch_NNNNN.json      metrics, energies and the batch info at each evaluation
    edits.csv                     one row per batch (row 0: before editing)
    edits.png                     metrics and energy against the number of edits
    summary.json                  final metrics, energy drift, timings
    checkpoints/                  run_sequential's checkpoints (every --eval-every batches)

and with ``--save-model DIR`` the edited model as a Hugging Face directory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

MODEL_HELP = "local Hugging Face directory, .gguf file, or named model (see `sphere-fast models`)"
RUN_KEYS = ("model", "data", "method", "sphere", "eta", "alpha", "edits", "batch_size", "hparams", "seed", "schema")


class CLIError(SystemExit):
    """A user error: printed as ``sphere-fast <command>: error: <message>``, exit status 1."""

    def __init__(self, command: str, message: str):
        super().__init__(f"sphere-fast {command}: error: {message}")
        self.message = message


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


# --------------------------------------------------------------------------- registration


def register(subparsers) -> None:
    """Add ``edit``, ``train-lm``, ``demo`` and ``models`` to an argparse subparsers object."""
    edit = subparsers.add_parser(
        "edit", help="sequentially edit a model with MEMIT/AlphaEdit (+ SPHERE) and record metrics",
        description="Sequential knowledge editing of a Hugging Face causal LM (a local directory, a .gguf file or "
                    "a named model), with evaluation, checkpoints, a CSV per batch and a plot.",
    )
    edit.add_argument("--model", required=True, help=MODEL_HELP)
    edit.add_argument("--data", required=True, help="CounterFact / EasyEdit / ZsRE JSON file")
    edit.add_argument("--schema", default="auto", choices=("auto", "counterfact", "easyedit", "zsre"))
    edit.add_argument("--method", required=True, choices=("memit", "alphaedit"))
    edit.add_argument("--sphere", action=argparse.BooleanOptionalAction, default=True,
                      help="project each update with SPHERE (default: on)")
    edit.add_argument("--eta", type=_unit_interval, default=None, help="SPHERE cumulative ratio (default 0.5)")
    edit.add_argument("--alpha", type=_unit_interval, default=None,
                      help="SPHERE suppression strength (default 0.5 AlphaEdit, 0.8 MEMIT)")
    edit.add_argument("--edits", type=_positive_int, required=True, help="number of requests to edit (file order)")
    edit.add_argument("--batch-size", type=_positive_int, required=True, help="requests per sequential batch")
    edit.add_argument("--hparams", default=None,
                      help="YAML/JSON hparams file or shipped name (default: sized to the model)")
    edit.add_argument("--stats-corpus", default=None, help="text corpus for the key covariance (default WikiText-2)")
    edit.add_argument("--eval-every", type=_positive_int, default=1,
                      help="evaluate and checkpoint every K batches (and after the last)")
    edit.add_argument("--out", required=True, help="output directory")
    edit.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    edit.add_argument("--save-model", default=None, metavar="DIR",
                      help="write the edited model to DIR as a Hugging Face directory (DIR must be new or empty)")
    edit.add_argument("--keep-checkpoints", type=_positive_int, default=None, metavar="N",
                      help="keep only the newest N checkpoints (default: all; each holds d x d state per layer)")
    edit.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    edit.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    edit.add_argument("--eval-batch-size", type=_positive_int, default=16)
    edit.add_argument("--fluency", action="store_true", help="also measure generation n-gram entropy")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--quiet", action="store_true", help="no progress bars")
    edit.set_defaults(handler=cmd_edit)

    train = subparsers.add_parser(
        "train-lm", help="train (or reuse) the small WikiText-2 Llama model used by tests and the demo",
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
    train.add_argument("--device", default=None)
    train.add_argument("--force", action="store_true", help="retrain even if cached")
    train.add_argument("--out", default=None, help="also copy the model directory here")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(handler=cmd_train_lm)

    demo = subparsers.add_parser(
        "demo", help="edit CounterFact with AlphaEdit with and without SPHERE on a real model (smollm2), compare",
    )
    demo.add_argument("--model", default=None,
                      help=f"{MODEL_HELP}, or train-lm (the small WikiText-2 model of `sphere-fast train-lm`); "
                           "default smollm2")
    demo.add_argument("--save-model", default=None, metavar="DIR",
                      help="write the AlphaEdit + SPHERE edited model to DIR as a Hugging Face directory")
    demo.add_argument("--edits", type=_positive_int, default=None,
                      help="edit-split requests to edit (default 20 on a CPU, 200 on a GPU)")
    demo.add_argument("--batch-size", type=_positive_int, default=None, help="edits per batch (default 20)")
    demo.add_argument("--out", default="out/demo", help="output directory (default ./out/demo)")
    demo.add_argument("--device", default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--synthetic", action="store_true", help="use synthetic requests even if CounterFact is present")
    demo.add_argument("--hparams", default=None,
                      help="YAML/JSON hparams file (default: the shipped AlphaEdit file for smollm2, else sized to "
                           "the model with L2 10)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=cmd_demo)

    models = subparsers.add_parser(
        "models", help="list the named models and the converted models in the cache",
        description="List the named models (--model NAME) and what the cache holds; --fetch converts ahead of use.",
    )
    models.add_argument("--fetch", nargs="+", default=(), metavar="MODEL",
                        help="fetch and convert these models (named models or .gguf files) now")
    models.add_argument("--verify", action="store_true",
                        help="hash every cached file (default: files with their recorded size and time are trusted)")
    models.set_defaults(handler=cmd_models)


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


def resolve_model_arg(spec: str | Path, command: str = "edit", flag: str = "--model") -> Path:
    """The Hugging Face directory for ``--model`` (fetched and converted once if needed), or a CLIError."""
    from .model_sources import ModelSourceError, resolve_model

    try:
        return resolve_model(spec, log=_note(command))
    except ModelSourceError as exc:
        raise CLIError(command, f"{flag} {exc.spec!r}: {exc.reason}") from None


def load_model(spec: str | Path, *, device=None, dtype: str = "float32", command: str = "edit"):
    """``(model, tokenizer)`` for ``--model``, with the model source's errors as CLIErrors."""
    from .model_sources import ModelSourceError, load_model as load

    try:
        return load(spec, device=device, dtype=dtype, log=_note(command))
    except ModelSourceError as exc:
        raise CLIError(command, f"--model {exc.spec!r}: {exc.reason}") from None


def _check_save_model(path: str | None, command: str) -> Path | None:
    from .model_sources import check_save_dir

    if path is None:
        return None
    try:
        return check_save_dir(path)
    except ValueError as exc:
        raise CLIError(command, f"--save-model: {exc}") from None


def save_edited_model(model, tokenizer, path: Path, source: dict, command: str) -> None:
    from .model_sources import save_model

    try:
        save_model(model, tokenizer, path, source=source)
    except ValueError as exc:
        raise CLIError(command, f"--save-model: {exc}") from None
    print(f"wrote the edited model to {path}")


def run_edit(
    *,
    model,
    tokenizer,
    requests: Sequence,
    method: str,
    sphere: bool,
    out: str | Path,
    batch_size: int,
    eval_every: int = 1,
    hparams=None,
    eta: float | None = None,
    alpha: float | None = None,
    stats_corpus: str | Path | None = None,
    resume: bool = False,
    keep_checkpoints: int | None = None,
    seed: int = 0,
    eval_batch_size: int = 16,
    fluency: bool = False,
    progress: bool = True,
    run_info: dict | None = None,
    title: str = "",
    log=print,
) -> dict:
    """Edit ``requests`` sequentially, evaluating/checkpointing every ``eval_every`` batches.

    Writes the files listed in the module docstring into ``out`` and returns the
    summary (also ``out/summary.json``). ``model`` must be the *unedited* model:
    with ``resume`` the editor's checkpoint is loaded by ``run_sequential``; the
    unedited model's neighbourhood predictions (for ``locality``) are taken first.
    """
    from . import paths
    from .editor import Editor
    from .hparams import default_hparams
    from .metrics import evaluate, layer_energies, neighborhood_predictions
    from .report import plot_run, read_csv, write_csv, write_json
    from .sequential import run_sequential

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    requests = list(requests)
    n_batches = -(-len(requests) // batch_size)
    csv_path, png_path = out / "edits.csv", out / "edits.png"
    if hparams is None:
        hparams = default_hparams(model, method)
    if stats_corpus is None and paths.wikitext_path("test").exists():
        stats_corpus = paths.wikitext_path("test")

    t_start = time.perf_counter()
    log(f"[{title or method}] neighbourhood predictions of the unedited model ({len(requests)} requests)")
    reference = neighborhood_predictions(model, tokenizer, requests, batch_size=eval_batch_size, progress=progress)
    editor = Editor(model, tokenizer, hparams, method=method, sphere=sphere, eta=eta, alpha=alpha,
                    stats_corpus=stats_corpus, cache_dir=paths.cache_dir(), seed=seed, progress=progress)

    rows: dict[int, dict[str, Any]] = {}
    if resume and csv_path.exists():
        rows = {int(r["batch"]): r for r in read_csv(csv_path)}
    if 0 not in rows:
        log(f"[{title or method}] evaluating the unedited model on all {len(requests)} requests")
        base = evaluate(model, tokenizer, requests, batch_size=eval_batch_size, fluency=fluency,
                        reference=reference, seed=seed, progress=progress)
        energies0 = layer_energies(editor.edited_weights())
        row0 = {"batch": 0, "edits": 0, "batch_size": 0, "eval_requests": len(requests)}
        row0.update({f"energy:{k}": v for k, v in energies0.items()})
        row0.update(_metric_cells(base))
        rows = {0: row0}
        write_json(out / "metrics" / "batch_00000.json", {"batch": 0, "edits": 0, "metrics": base, "energy": energies0})
        write_csv(csv_path, [rows[k] for k in sorted(rows)])

    evaluations: dict[int, dict] = {}

    def on_batch(batch_index: int, batch_requests, info: dict) -> None:
        number = batch_index + 1
        edits = batch_index * batch_size + len(batch_requests)
        energies = layer_energies(editor.edited_weights())
        seconds = info.get("seconds", {})
        row = {"batch": number, "edits": edits, "batch_size": len(batch_requests),
               "seconds_total": seconds.get("total"), "seconds_stats": seconds.get("stats", 0.0),
               "seconds_sphere": seconds.get("sphere", 0.0 if not sphere else None)}
        row.update({f"energy:{k}": v for k, v in energies.items()})
        if number % eval_every == 0 or number == n_batches:
            done = requests[:edits]
            metrics = evaluate(model, tokenizer, done, batch_size=eval_batch_size, fluency=fluency,
                               reference=reference[:edits], seed=seed, progress=progress)
            row["eval_requests"] = len(done)
            row.update(_metric_cells(metrics))
            evaluations[number] = metrics
            write_json(out / "metrics" / f"batch_{number:05d}.json",
                       {"batch": number, "edits": edits, "metrics": metrics, "energy": energies, "info": info})
            log(f"[{title or method}] batch {number}/{n_batches}, {edits} edits: " + _metric_line(metrics))
        # A batch redone after a resume replaces its row and any later ones.
        for later in [k for k in rows if k >= number]:
            del rows[later]
        rows[number] = row
        ordered = [rows[k] for k in sorted(rows)]
        write_csv(csv_path, ordered)
        if number in evaluations:
            plot_run(ordered, png_path, title=title)

    infos = run_sequential(editor, requests, batch_size=batch_size, checkpoint_every=eval_every,
                           checkpoint_dir=out / "checkpoints", resume=resume, keep_last=keep_checkpoints,
                           on_batch=on_batch, progress=progress)
    ordered = [rows[k] for k in sorted(rows)]
    plot_run(ordered, png_path, title=title)

    from .report import energy_drift

    final_eval = evaluations.get(n_batches)
    if final_eval is None:  # every batch was already done before a resume
        final_eval = evaluate(model, tokenizer, requests, batch_size=eval_batch_size, fluency=fluency,
                              reference=reference, seed=seed, progress=progress)
    timed = [r for r in ordered if r.get("seconds_total") is not None]
    # Key statistics (C0) are computed once and cached; like the paper, leave them out of edit time.
    total = sum(r["seconds_total"] - (r.get("seconds_stats") or 0.0) for r in timed)
    stats_s = sum(r.get("seconds_stats") or 0.0 for r in timed)
    sphere_s = sum(r.get("seconds_sphere") or 0.0 for r in timed)
    summary = {
        **(run_info or {}),
        "method": method,
        "sphere": sphere,
        "edits": len(requests),
        "batches": n_batches,
        "batch_size": batch_size,
        "hparams": hparams.to_dict(),
        "before": {k: rows[0].get(k) for k in ("efficacy", "generalization", "specificity", "locality", "fluency")},
        "after": {k: final_eval.get(k) for k in ("efficacy", "generalization", "specificity", "locality", "fluency")},
        "final_metrics": final_eval,
        "energy_initial": {k[len("energy:"):]: v for k, v in rows[0].items() if k.startswith("energy:")},
        "energy_final": {k[len("energy:"):]: v for k, v in ordered[-1].items() if k.startswith("energy:")},
        "energy_drift": energy_drift(ordered),
        "edit_seconds": total,
        "stats_seconds": stats_s,
        "sphere_seconds": sphere_s,
        "sphere_share": (sphere_s / total) if total else None,
        "batches_this_run": len(infos),
        "wall_seconds_this_run": time.perf_counter() - t_start,
    }
    write_json(out / "summary.json", summary)
    return summary


def _metric_cells(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("efficacy", "generalization", "specificity", "locality", "fluency")
            if metrics.get(k) is not None}


def _metric_line(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in ("efficacy", "generalization", "specificity", "locality", "fluency")
                     if metrics.get(k) is not None)


def _check_resume(out: Path, settings: dict, command: str) -> None:
    from .report import read_json, write_json

    path = out / "run.json"
    if path.exists():
        old = read_json(path)
        diff = [k for k in RUN_KEYS if old.get(k) != settings.get(k)]
        if diff:
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {settings.get(k)!r}" for k in diff)
            raise CLIError(command, f"--resume: {out} holds a different run ({details})")
    elif not (out / "checkpoints").exists():
        print(f"sphere-fast {command}: note: --resume: nothing to resume in {out}, starting a new run", file=sys.stderr)
    write_json(path, settings)


def cmd_edit(args) -> int:
    from .datasets import DatasetError, load_requests

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
        try:
            requests = load_requests(data, limit=args.edits, schema=args.schema, invalid="skip")
        except DatasetError as exc:
            raise CLIError(command, f"--data: {exc}") from None
    for w in caught:
        print(f"sphere-fast edit: note: {w.message}", file=sys.stderr)
    if len(requests) < args.edits:
        raise CLIError(command, f"--edits {args.edits}: {data} holds only {len(requests)} editable requests")

    hparams = None
    if args.hparams is not None:
        from .hparams import load_hparams

        try:
            hparams = load_hparams(args.hparams)
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError(command, f"--hparams {args.hparams!r}: {exc}") from None

    model_path = resolve_model_arg(args.model, command)
    settings = {"model": str(model_path.resolve()), "data": str(data.resolve()), "method": args.method,
                "sphere": args.sphere, "eta": args.eta, "alpha": args.alpha, "edits": args.edits,
                "batch_size": args.batch_size, "hparams": args.hparams, "seed": args.seed, "schema": args.schema,
                "eval_every": args.eval_every, "stats_corpus": args.stats_corpus, "dtype": args.dtype}
    if args.resume:
        _check_resume(out, settings, command)
    else:
        from .report import write_json

        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", settings)

    import torch

    torch.manual_seed(args.seed)
    device = _device(args.device, command)
    model, tokenizer = load_model(model_path, device=device, dtype=args.dtype, command=command)
    try:
        summary = run_edit(
            model=model, tokenizer=tokenizer, requests=requests, method=args.method, sphere=args.sphere, out=out,
            batch_size=args.batch_size, eval_every=args.eval_every, hparams=hparams, eta=args.eta, alpha=args.alpha,
            stats_corpus=args.stats_corpus, resume=args.resume, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
            eval_batch_size=args.eval_batch_size,
            fluency=args.fluency, progress=not args.quiet, run_info={"settings": settings},
            title=f"{args.method}{' + SPHERE' if args.sphere else ''}",
        )
    except FileNotFoundError as exc:
        raise CLIError(command, str(exc)) from None
    print(f"done: {summary['edits']} edits in {summary['batches']} batches; after: {_metric_line(summary['after'])}")
    print(f"mean energy drift {_mean(summary['energy_drift'].values()):+.4%}; "
          f"edit time {summary['edit_seconds']:.1f} s, SPHERE share "
          + (f"{summary['sphere_share']:.1%}" if summary["sphere_share"] is not None else "-"))
    print(f"wrote {out / 'edits.csv'}, {out / 'edits.png'}, {out / 'summary.json'}, {out / 'metrics'}/")
    if save_dir is not None:
        save_edited_model(model, tokenizer, save_dir, {"kind": "edited", "base_model": settings["model"],
                                                      "method": args.method, "sphere": args.sphere,
                                                      "edits": args.edits, "data": settings["data"]}, command)
    return 0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- train-lm


def cmd_train_lm(args) -> int:
    import shutil

    from . import train_lm

    command = "train-lm"
    device = _device(args.device, command)
    cfg = train_lm.PRESETS[args.preset] if args.preset else train_lm.default_config(device)
    overrides = {k: getattr(args, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                               "intermediate_size", "seq_len", "batch_size", "steps", "lr", "seed")
                 if getattr(args, k) is not None}
    try:
        cfg = cfg.replace(**overrides)
        path, info, reused = train_lm.ensure_model(cfg, device=device, progress=not args.quiet, force=args.force)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(command, str(exc)) from None
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
    from .demo import DEFAULT_MODEL, TRAINED_MODEL, run_demo

    command = "demo"
    device = _device(args.device, command)
    if args.hparams is not None and not Path(args.hparams).exists():
        raise CLIError(command, f"--hparams {args.hparams!r}: file not found")
    save_dir = _check_save_model(args.save_model, command)
    model = args.model or DEFAULT_MODEL
    if model != TRAINED_MODEL:
        model = resolve_model_arg(model, command)
    run_demo(model=model, edits=args.edits, batch_size=args.batch_size, out=args.out, device=device, seed=args.seed,
             synthetic=args.synthetic, progress=not args.quiet, hparams_file=args.hparams, save_model_dir=save_dir)
    return 0


# --------------------------------------------------------------------------- models


def cmd_models(args) -> int:
    from .model_sources import list_models, models_dir

    for spec in args.fetch:
        path = resolve_model_arg(spec, "models", "--fetch")
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
    others = [r for r in rows if not r["named"]]
    if others:
        print("converted GGUF files (--model FILE.gguf):")
        for row in others:
            state = f"{row['size'] / 2**20:.0f} MiB" if row["cached"] else "incomplete (rebuilt on next use)"
            print(f"  {row['name']}  {row['source']}, {state}: {row['path']}")
    return 0
