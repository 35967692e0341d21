"""``sphere-fast demo``: an editing method (AlphaEdit by default) with and without SPHERE on a real model.

1. Take the model: by default the named model ``smollm2`` (SmolLM2-135M-Instruct,
   fetched and converted once, see :mod:`.model_sources`); any local Hugging Face
   directory or ``.gguf`` file; or ``train-lm``, the small Llama model of
   :mod:`.train_lm` (trained, or reused from the cache).
2. Take the first ``edits`` requests of CounterFact's edit split from the data
   folder (EasyEdit's flat file; synthetic requests about invented subjects when
   the folder is absent or ``synthetic=True``). Defaults are sized by device
   (:data:`CPU_SIZES`, :data:`GPU_SIZES`; measured times are in bench/results).
3. Edit them sequentially in batches of ``batch_size`` with ``method``
   (AlphaEdit unless told; any of :data:`~sphere_fast.editing.methods.METHODS`),
   once without SPHERE and once with it (eta 0.5, the method's alpha: 0.5 for
   AlphaEdit, 0.8 for the others), each from a fresh copy of the unedited
   model, with the model's shipped settings for the method without SPHERE
   (:func:`~sphere_fast.editing.hparams.shipped_for_model`), else the hyperparameters
   :func:`~sphere_fast.editing.hparams.default_hparams` derives for the model
   with :data:`DEMO_OVERRIDES` (or a ``hparams`` file).
4. Print a table (the unedited model, then both runs): efficacy,
   generalization, specificity, locality (agreement with the unedited
   model's top-1 on the neighbourhood prompts), the mean relative change of the
   edited layers' hyperspherical energy, edit time and SPHERE's share of it;
   then, for the first :data:`EXAMPLES` edited facts, the greedy continuation of
   the rewrite prompt, a paraphrase and a neighbourhood prompt by the unedited
   model and by each edited one.
5. Write ``demo.png`` (metrics against edits), ``demo_examples.png`` (the
   table and the continuations), ``demo.json`` and each run's own files (see
   :mod:`.running`) under ``out``; with ``save_model_dir``, the method + SPHERE
   edited model as a Hugging Face directory.

The numbers are whatever this model and data give.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

DEFAULT_METHOD = "alphaedit"
DEFAULT_MODEL = "smollm2"
TRAINED_MODEL = "train-lm"  # the small WikiText-2 model of sphere_fast.harness.train_lm
# Models without shipped settings get default_hparams with these changes. default_hparams gives small
# models the L2 of tiny random models; a trained model's keys are like a real LLM's, where the paper's
# L2 = 10 keeps updates moderate (docs/editing.md).
DEMO_OVERRIDES = {"L2": 10.0}
EXAMPLES = 3  # edited facts whose continuations are printed
CONTINUATION_TOKENS = 8


def run_demo(
    *,
    model: str | Path = DEFAULT_MODEL,
    method: str = DEFAULT_METHOD,
    edits: int | None = None,
    batch_size: int | None = None,
    out: str | Path = "out/demo",
    device=None,
    seed: int = 0,
    synthetic: bool = False,
    progress: bool = True,
    train_config=None,
    hparams_overrides: dict | None = None,
    hparams_file: str | Path | None = None,
    save_model_dir: str | Path | None = None,
    log=print,
) -> dict:
    """Run the comparison and return the summary written to ``out/demo.json``.

    ``model`` is a named model, a local directory, a ``.gguf`` file or
    :data:`TRAINED_MODEL`, for which ``train_config`` replaces the device's
    default :class:`~.train_lm.TrainConfig`;
    ``method`` names the editing method (:func:`~sphere_fast.editing.methods.method_class`);
    ``hparams_file`` (YAML/JSON or shipped name) replaces the model's shipped
    settings for it or the model-sized defaults with
    :data:`DEMO_OVERRIDES`; ``hparams_overrides`` then replaces single keys.
    ``edits`` and ``batch_size`` default to :data:`CPU_SIZES` or :data:`GPU_SIZES`
    by device; on a CPU the C0 corpus is the hparams' ``mom2_n_samples`` lines,
    on a GPU at least ``GPU_SIZES["stats_lines"]``.
    """
    import torch

    from .._validation import check_positive_int
    from ..editing import paths
    from ..editing.methods import method_class
    from .datasets import load_requests, synthetic_requests
    from .model_sources import check_save_dir, load_model, named_model, resolve_model, save_model
    from .report import format_table, plot_comparison, read_csv, write_json
    from .running import choose_hparams, hparams_source, run_edit

    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    edits = sizes["edits"] if edits is None else edits
    batch_size = sizes["batch_size"] if batch_size is None else batch_size
    check_positive_int(edits, "edits")
    check_positive_int(batch_size, "batch_size")
    method_label = method_class(method).label  # ValueError naming the known methods
    method = method_class(method).name
    if save_model_dir is not None:
        save_model_dir = check_save_dir(save_model_dir)
    if train_config is not None and str(model) != TRAINED_MODEL:
        raise ValueError(f"train_config applies to model={TRAINED_MODEL!r} only, got model={str(model)!r}")
    out.mkdir(parents=True, exist_ok=True)

    if str(model) == TRAINED_MODEL:
        model_dir, model_info = _trained_model(train_config, device, progress, log)
    else:
        model_dir = resolve_model(model, log=lambda m: log(f"demo: {m}"))
        model_info = {"spec": str(model)}

    base, tokenizer = load_model(model_dir)
    config = base.config
    shape = f"{config.hidden_size} hidden x {config.num_hidden_layers} layers, vocab {config.vocab_size}"
    model_info.update(path=str(model_dir), shape=shape, parameters=sum(p.numel() for p in base.parameters()))
    log(f"demo: model {model_dir} ({shape}, {model_info['parameters']:,} parameters)")
    source = paths.counterfact_path()
    if synthetic or not source.exists():
        requests = synthetic_requests(tokenizer, edits, seed)
        data_name = "synthetic (invented subjects)"
        if not synthetic:
            log(f"demo: {source} not found, using synthetic requests")
    else:
        requests = load_requests(source, limit=edits)
        data_name = f"CounterFact ({source.name}), first {len(requests)}"
    log(f"demo: {len(requests)} requests from {data_name}, batches of {batch_size}")

    n_batches = -(-len(requests) // batch_size)
    eval_every = max(1, n_batches // 4)
    # Both runs use the method's settings without SPHERE, so that SPHERE is the only difference between them.
    source = hparams_source(method, sphere=False, given=hparams_file, model_name=named_model(model, model_dir))
    examples = requests[:EXAMPLES]
    prompts = [p for req in examples for p in _example_prompts(req)]
    continuations = {"unedited": _continue(base.to(device), tokenizer, prompts)}
    del base
    summaries, rows = {}, {}
    for label, sphere in ((method_label, False), (f"{method_label} + SPHERE", True)):
        run_dir = out / (f"{method}_sphere" if sphere else method)
        if run_dir.exists():  # a fresh comparison every time
            shutil.rmtree(run_dir)
        edited, tokenizer = load_model(model_dir, device=device)
        torch.manual_seed(seed)
        hparams = choose_hparams(edited, method, source=source, default_overrides=DEMO_OVERRIDES)
        if device.type == "cuda" and hparams.mom2_n_samples < sizes["stats_lines"]:
            hparams = hparams.replace(mom2_n_samples=sizes["stats_lines"])
        if hparams_overrides:
            hparams = hparams.replace(**hparams_overrides)
        summaries[label] = run_edit(
            model=edited, tokenizer=tokenizer, requests=requests, method=method, sphere=sphere, out=run_dir,
            batch_size=batch_size, hparams=hparams, eval_every=eval_every, seed=seed, progress=progress,
            run_info={"model_dir": str(model_dir), "data": data_name}, title=label, log=log,
        )
        rows[label] = read_csv(run_dir / "edits.csv")
        continuations[label] = _continue(edited, tokenizer, prompts)
        if sphere and save_model_dir is not None:
            save_model(edited, tokenizer, save_model_dir,
                       source={"kind": "edited", "base_model": str(model_dir), "method": method, "sphere": True,
                               "edits": len(requests), "data": data_name})
            log(f"demo: wrote the {label} edited model to {save_model_dir}")
        del edited

    first = next(iter(summaries.values()))
    table_rows = [{"run": "unedited", **first["before"]}]
    for label, s in summaries.items():
        drift = list(s["energy_drift"].values())
        table_rows.append({
            "run": label, **s["after"],
            "drift": 100 * sum(drift) / len(drift) if drift else None,
            "seconds": s["edit_seconds"],
            "share": 100 * s["sphere_share"] if s["sphere_share"] is not None else None,
        })
    columns = [("run", "run", ""), ("efficacy", "efficacy", ".3f"), ("generalization", "generalization", ".3f"),
               ("specificity", "specificity", ".3f"), ("locality", "locality", ".3f"),
               ("drift", "energy drift %", "+.3f"), ("seconds", "edit s", ".1f"), ("share", "SPHERE share %", ".2f")]
    table = format_table(table_rows, columns)
    example_rows = _example_rows(examples, continuations)
    plot_comparison(rows, out / "demo.png",
                    title=f"{len(requests)} edits, batches of {batch_size}, {Path(model_dir).name} ({shape})")
    result = {
        "model_dir": str(model_dir),
        "model": model_info,
        "data": data_name,
        "method": method,
        "edits": len(requests),
        "batch_size": batch_size,
        "device": str(device),
        "table": table_rows,
        "hparams_source": source or "default_hparams",
        "continuations": example_rows,
        "runs": {k: {kk: v[kk] for kk in ("before", "after", "energy_drift", "edit_seconds", "sphere_seconds",
                                           "sphere_share", "hparams")} for k, v in summaries.items()},
        "wall_seconds": time.perf_counter() - t0,
    }
    plot_examples(table_rows, example_rows, out / "demo_examples.png",
                  title=f"{Path(model_dir).name}: {len(requests)} edits; greedy continuations of {len(examples)} of them")
    result["wall_seconds"] = time.perf_counter() - t0
    write_json(out / "demo.json", result)
    log("")
    log(f"{len(requests)} edits ({data_name}), {method_label}, batches of {batch_size}; top-1 token accuracy on the "
        "edited requests;")
    log("energy drift = mean over edited layers of E_final / E_initial - 1 (hyperspherical energy, s = 2);")
    log("SPHERE share = projection time / edit time (key statistics excluded).")
    log(table)
    log(f"\nGreedy continuations ({CONTINUATION_TOKENS} tokens) of {len(examples)} edited facts: the rewrite prompt, a "
        "paraphrase and a neighbourhood prompt (whose answer should not change).")
    log(format_examples(example_rows))
    log(f"\nwrote {out / 'demo.png'}, {out / 'demo_examples.png'}, {out / 'demo.json'} and per-run files in {out}/{method}*/ "
        f"({result['wall_seconds']:.0f} s)")
    return result


CPU_SIZES = {"edits": 60, "batch_size": 20}
GPU_SIZES = {"edits": 200, "batch_size": 20, "stats_lines": 100000}


def _example_prompts(request) -> list[str]:
    """The rewrite prompt, the first paraphrase and the first neighbourhood prompt (those that exist)."""
    prompts = [request.text]
    prompts += list(request.rephrase_prompts[:1]) + list(request.neighborhood_prompts[:1])
    return prompts


def _continue(model, tokenizer, prompts: list[str]) -> list[str]:
    from .metrics import generate

    return generate(model, tokenizer, prompts, max_new_tokens=CONTINUATION_TOKENS, continuation=True)


def _example_rows(examples, continuations: dict[str, list[str]]) -> list[dict]:
    """One row per (fact, prompt): the prompt, the answer wanted, and each model's continuation."""
    rows, position = [], 0
    for request in examples:
        kinds = ["rewrite"] + ["paraphrase"] * bool(request.rephrase_prompts) + ["neighbour"] * bool(
            request.neighborhood_prompts)
        for kind, prompt in zip(kinds, _example_prompts(request)):
            wanted = request.neighborhood_targets[0] if kind == "neighbour" else request.target_new
            rows.append({"fact": f"{request.subject}: {request.target_true} -> {request.target_new}", "kind": kind,
                         "prompt": prompt, "wanted": wanted,
                         **{label: texts[position] for label, texts in continuations.items()}})
            position += 1
    return rows


def format_examples(rows: list[dict]) -> str:
    """The continuations as indented text blocks, one per prompt."""
    lines, fact = [], None
    for row in rows:
        if row["fact"] != fact:
            fact = row["fact"]
            lines.append(f"\n* {fact}")
        lines.append(f"  {row['kind']} (wanted: {row['wanted']!r}): {row['prompt']!r}")
        for label, text in row.items():
            if label not in ("fact", "kind", "prompt", "wanted"):
                lines.append(f"    {label:<20} ...{text!r}")
    return "\n".join(lines)


def plot_examples(table_rows: list[dict], example_rows: list[dict], path: Path, *, title: str) -> None:
    """What the demo prints, as a PNG: the metrics table as bars, the continuations as text."""
    from .report import figure, save_png

    metrics = ("efficacy", "generalization", "specificity", "locality")
    plt, fig, (ax_bar, ax_text) = figure(2)
    fig.set_size_inches(17, 7)
    width = 0.8 / max(1, len(table_rows))
    for i, row in enumerate(table_rows):
        values = [row.get(m) if row.get(m) is not None else 0.0 for m in metrics]
        ax_bar.bar([j + i * width for j in range(len(metrics))], values, width, label=row["run"])
    ax_bar.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, fontsize=8)
    ax_bar.set_ylim(0, 1.05)
    ax_bar.set_ylabel("top-1 token accuracy")
    ax_bar.legend(fontsize=8)
    ax_bar.grid(axis="y", alpha=0.3)
    ax_text.axis("off")
    ax_text.text(0, 1, format_examples(example_rows).strip("\n"), va="top", ha="left", family="monospace",
                 fontsize=6.5, transform=ax_text.transAxes, wrap=False)
    fig.suptitle(title, fontsize=10)
    save_png(plt, fig, path)


def _trained_model(train_config, device, progress: bool, log) -> tuple[Path, dict]:
    """The small WikiText-2 model of :mod:`.train_lm`, trained now or reused from the cache."""
    from ..editing import paths
    from . import train_lm

    cfg = train_config or train_lm.default_config(device)
    log(f"demo: train-lm model {cfg.hidden_size} hidden x {cfg.num_layers} layers, vocab {cfg.vocab_size} "
        f"(cache {paths.cache_dir() / train_lm.MODEL_SUBDIR})")
    model_dir, info, reused = train_lm.ensure_model(cfg, device=device, progress=progress)
    log(f"demo: {'reused' if reused else 'trained'} {model_dir}: held-out perplexity "
        f"{info['heldout_perplexity']:.1f}, {info['parameters']:,} parameters"
        + ("" if reused else f", {info['seconds']['total']:.0f} s"))
    return model_dir, {"spec": TRAINED_MODEL, "config": info["config"],
                       "heldout_perplexity": info["heldout_perplexity"], "reused": reused}
