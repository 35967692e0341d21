"""Sequential editing of a Hugging Face causal LM (MEMIT, AlphaEdit, ...), with SPHERE.

One :class:`Editor` holds everything that persists between batches: the
context templates, the method (an :class:`~.strategy.EditMethod` from
:mod:`.methods`, with its own state, e.g. MEMIT's C0 or AlphaEdit's null-space
projector P and ``cache_c``) and, with SPHERE, each layer's projector. Per-layer
state lives on that layer's device, so accelerate ``device_map`` sharding works
unchanged.

A batch runs as in the official SPHERE code (an AlphaEdit fork): target values
z for every request at the last edited layer; then, for each edited layer in
ascending order, keys on the current model, the residual spread over the
remaining layers, the method's closed-form update Delta, the projection
``Delta P_perp`` fitted (first batch) or warm-refitted (later batches) on the
*current* weight, and the in-place update, before the next layer's keys are
computed. SPHERE acts on the input dimension d of the ``[out, in]`` oriented
weight (rows are neurons): for Llama's ``down_proj`` that is the stored weight
``[hidden, intermediate]``; for GPT-2's ``Conv1D`` (stored ``[in, out]``) it is
the transpose, so the projected dimension is the MLP's intermediate size in
both cases.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Sequence

import torch

from .._validation import all_finite, check_alpha, check_eta
from ..projector import SphereProjector
from . import paths
from .compute import context_templates, validate_request
from .covariance import layer_second_moments, load_cached, stats_keys
from .hparams import FIELDS as HPARAM_FIELDS, EditHparams
from .methods import method_class
from .model_utils import get_module, is_conv1d, oriented_weight, tokenizer_fingerprint, weights_fingerprint
from .requests import EditRequest
from .strategy import Batch

STATE_FORMAT = 1
DEFAULT_ETA = 0.5

# Context templates per (weights, tokenizer, seed): shared by every Editor (and
# so by both methods) on the same unedited model.
_TEMPLATE_CACHE: dict[tuple, list[list[str]]] = {}
# The parts of a batch that edit_batch times (info["seconds"]; reports and bench/ read these keys).
TIMED_PARTS = ("stats", "targets", "keys", "solve", "sphere", "apply", "cache")


class EditCollapsed(FloatingPointError):
    """A batch's update, or the weights it produced, held NaN/Inf: the method diverged (the weights are
    restored). Studies record it as the run's collapse; anything else that fails is a bug to surface."""


@contextlib.contextmanager
def _timed(seconds: dict[str, float], part: str, clock):
    """Add the block's time by ``clock`` to ``seconds[part]``."""
    start = clock()
    yield
    seconds[part] += clock() - start


class Editor:
    """Sequential editor. See the module docstring for the algorithm.

    Parameters
    ----------
    model, tokenizer : a transformers causal LM and its tokenizer.
    hparams : :class:`EditHparams` (see :func:`~sphere_fast.editing.hparams.load_hparams`).
    method : a name in :data:`~.methods.METHODS` ("memit", "alphaedit", ...).
    sphere : project each update with SPHERE; False gives the base method exactly.
    eta, alpha : SPHERE's cumulative ratio and suppression strength; None takes
        ``hparams.cumulative_ratio`` / ``suppression_strength``, then the paper's
        defaults (eta 0.5; alpha 0.5 for AlphaEdit, 0.8 otherwise).
    stats_corpus : .txt or .jsonl file for C0 (default: ``hparams.mom2_dataset`` when it
        is such a file, else WikiText-2 test).
    cache_dir : where C0 is cached (default :func:`paths.cache_dir`).
    seed : seeds the context-template sampling.
    projector : the class that fits SPHERE's projection (``fit(W, eta, alpha)``, ``refit(W)``,
        ``apply_(W, B)``, ``rank``, state_dict round trip); benchmarks pass an instrumented one.
    clock : the timer of ``info["seconds"]`` (default ``time.perf_counter``); benchmarks pass one that
        synchronises the device first.
    overlap_sphere_fit : start every layer's SPHERE fit when the batch starts, on a background thread
        (a side stream on CUDA), so that it runs while the method computes its targets; each fit reads
        the batch-start copy of its weight and is used only if the weight still equals that copy when
        its update comes (otherwise the layer is fitted then, as without it). Same results; off by
        default until a GPU measures it (``bench/bench_e2e.py``).
    """

    def __init__(self, model, tokenizer, hparams: EditHparams, *, method: str, sphere: bool = True,
                 eta: float | None = None, alpha: float | None = None, stats_corpus: str | Path | None = None,
                 cache_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
                 projector=SphereProjector, clock=time.perf_counter, overlap_sphere_fit: bool = False):
        if not isinstance(hparams, EditHparams):
            raise TypeError(f"hparams must be an EditHparams (see load_hparams), got {type(hparams).__name__}")
        self._method_class = method_class(method)
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = hparams
        self.method = self._method_class.name
        self.projector_class = projector
        self.clock = clock
        self.sphere = bool(sphere)
        if not isinstance(overlap_sphere_fit, bool):
            raise TypeError(f"overlap_sphere_fit must be True or False, got {overlap_sphere_fit!r}")
        self.overlap_sphere_fit = overlap_sphere_fit
        self._prefit: _Prefit | None = None
        # One fitting thread and one side stream per device for the Editor's life: the extension's
        # cuBLAS/cuSOLVER handles are per thread, and a thread per batch would create and destroy them
        # (a device-wide sync) every batch.
        self._prefit_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._prefit_streams: dict[torch.device, torch.cuda.Stream] = {}
        eta = eta if eta is not None else hparams.cumulative_ratio
        alpha = alpha if alpha is not None else hparams.suppression_strength
        self.eta = check_eta(DEFAULT_ETA if eta is None else eta)
        self.alpha = check_alpha(self._method_class.default_alpha if alpha is None else alpha)
        if stats_corpus is None:
            # mom2_dataset may name a local corpus file; names like "wikipedia" fall back to WikiText-2.
            named = Path(str(hparams.mom2_dataset)).expanduser()
            stats_corpus = named if named.suffix in (".txt", ".jsonl") and named.is_file() else paths.wikitext_path()
            if stats_corpus != named and hparams.mom2_dataset != "wikitext":
                warnings.warn(f"mom2_dataset {hparams.mom2_dataset!r} is not a local .txt/.jsonl file: key statistics "
                              f"from {str(stats_corpus)!r} (pass stats_corpus to choose)", stacklevel=2)
        self.stats_corpus = Path(stats_corpus)
        if not self.stats_corpus.exists():
            raise FileNotFoundError(f"stats_corpus {str(self.stats_corpus)!r} does not exist")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
        self.seed = int(seed)
        self.progress = progress

        n_layers = int(model.config.num_hidden_layers)
        if hparams.v_loss_layer is None and self._method_class.uses_target_values:
            raise ValueError(f"hparam 'v_loss_layer' is required for {self._method_class.name} (its target values)")
        if hparams.v_loss_layer is not None and hparams.v_loss_layer >= n_layers:
            raise ValueError(f"hparam 'v_loss_layer' ({hparams.v_loss_layer}) must be < the model's {n_layers} layers")
        if hparams.layers[-1] >= n_layers:
            raise ValueError(f"hparam 'layers' {hparams.layers} must be < the model's {n_layers} layers")
        self.edited_module_names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
        for name in self.edited_module_names:
            oriented_weight(get_module(model, name))  # raises for unsupported module types
        loss_layers = () if hparams.v_loss_layer is None else (hparams.v_loss_layer,)
        for name in [hparams.layer_module_tmp.format(l) for l in (*hparams.layers, *loss_layers)]:
            get_module(model, name)
        get_module(model, hparams.ln_f_module)
        get_module(model, hparams.lm_head_module)

        self.batches_done = 0
        self._base_fp = weights_fingerprint(model)
        self._templates: list[list[str]] | None = None
        self._stats_keys: dict[str, str] = {}
        self.edit_method = self._method_class(hparams)
        self._projectors: dict[str, SphereProjector] = {}

    # -- preparation -------------------------------------------------------------
    def _weight(self, name: str) -> torch.Tensor:
        return oriented_weight(get_module(self.model, name))

    @property
    def templates(self) -> list[list[str]]:
        if self._templates is None:
            key = (self._base_fp, tokenizer_fingerprint(self.tokenizer), self.seed)
            if key not in _TEMPLATE_CACHE:
                _TEMPLATE_CACHE[key] = context_templates(self.model, self.tokenizer, seed=self.seed)
            self._templates = copy.deepcopy(_TEMPLATE_CACHE[key])
        return self._templates

    def _stats_ready(self) -> bool:
        return all(self.edit_method.has_key_statistics(name) for name in self.edited_module_names)

    def _set_stats(self, c0s: dict[str, torch.Tensor]) -> None:
        for name in self.edited_module_names:
            self.edit_method.set_key_statistics(name, c0s[name].to(self._weight(name).device))

    def _prepare(self) -> None:
        """Templates and key statistics, from the unedited model (first batch only)."""
        self.templates  # noqa: B018 - computes and caches
        if not self.edit_method.uses_key_statistics or self._stats_ready():
            return
        c0s, keys = layer_second_moments(
            self.model, self.tokenizer, self.edited_module_names, corpus=self.stats_corpus,
            n_samples=self.hparams.mom2_n_samples, dtype=self.hparams.mom2_dtype, cache_dir=self.cache_dir,
            progress=self.progress, weights_fp=self._base_fp,
        )
        self._stats_keys = keys
        self._set_stats(c0s)

    def key_statistics(self, name: str) -> torch.Tensor:
        """C0 of an edited module, always of the unedited weights: computed (or read from the cache) while the
        model holds them, afterwards only read from the cache by its key (never computed on edited weights)."""
        if weights_fingerprint(self.model) != self._base_fp:
            return self._cached_c0(name, self._stats_keys.get(name))
        c0s, _ = layer_second_moments(
            self.model, self.tokenizer, [name], corpus=self.stats_corpus, n_samples=self.hparams.mom2_n_samples,
            dtype=self.hparams.mom2_dtype, cache_dir=self.cache_dir, progress=self.progress, weights_fp=self._base_fp,
        )
        return c0s[name]

    # -- editing -----------------------------------------------------------------
    def edit_batch(self, requests: Sequence[EditRequest]) -> dict:
        """Apply one batch of edits. All-or-nothing: on any error every edited weight is restored."""
        requests = list(requests)
        if not requests:
            raise ValueError("requests must not be empty")
        for i, req in enumerate(requests):
            validate_request(self.tokenizer, req, self.hparams.fact_token, f"requests[{i}]")
        t_start = self.clock()
        seconds = {"total": 0.0, **dict.fromkeys(TIMED_PARTS, 0.0)}
        with _timed(seconds, "stats", self.clock):
            self._prepare()
        for name in self.edited_module_names:
            self.edit_method.start(name, self._weight(name))

        snapshot = {name: self._weight(name).clone() for name in self.edited_module_names}
        projectors = {name: copy.copy(p) for name, p in self._projectors.items()}
        if self.sphere and self.overlap_sphere_fit:
            self._prefit = _Prefit(self, snapshot)
        try:
            info = self._edit(requests, seconds)
        except BaseException:
            self._close_prefit()
            with torch.no_grad():
                for name, saved in snapshot.items():
                    self._weight(name).copy_(saved)
            self._projectors = projectors
            raise
        self._close_prefit()
        self.batches_done += 1
        seconds["total"] = self.clock() - t_start
        info.update(batch_size=len(requests), seconds=seconds, batch_index=self.batches_done - 1)
        return info

    def _edit(self, requests: list[EditRequest], seconds: dict) -> dict:
        batch = Batch(model=self.model, tokenizer=self.tokenizer, hparams=self.hparams, requests=requests,
                      templates=self.templates, module_names=list(self.edited_module_names), weight=self._weight,
                      apply=lambda name, delta: self._apply(name, delta, seconds),
                      timed=lambda part: _timed(seconds, part, self.clock))
        return self.edit_method.run_batch(batch)

    def _apply(self, name: str, delta: torch.Tensor, seconds: dict) -> dict:
        """Add one layer's update, projected with SPHERE when on; the layer's info."""
        W = self._weight(name)
        if tuple(delta.shape) != tuple(W.shape):
            raise RuntimeError(f"{name}: update shape {tuple(delta.shape)} does not match the oriented "
                               f"weight {tuple(W.shape)} (is hidden_size the module's output size?)")
        with torch.no_grad():
            delta = self.edit_method.before_projection(name, W, delta)
            if not all_finite(delta):  # before SPHERE, whose argument check would call it bad input
                raise EditCollapsed(f"{name}: the update holds NaN/Inf")
            before_w = W.clone()
            rank = None
            if self.sphere:
                with _timed(seconds, "sphere", self.clock):
                    proj = self._prefit.take(name, W) if self._prefit is not None else None
                    if proj is None:
                        proj = self._fit(W, self._projectors.get(name))
                    self._projectors[name] = proj
                    rank = proj.rank
                    proj.apply_(W, delta.to(torch.float32) if delta.dtype == torch.float64 else delta)
            else:
                with _timed(seconds, "apply", self.clock):
                    W.add_(delta.to(W.dtype))
            if not all_finite(W):
                raise EditCollapsed(f"{name}: the update produced NaN/Inf weights")
            return {
                "rank": rank,
                "update_norm": float(delta.norm()),
                "projected_norm": float((W.float() - before_w.float()).norm()),
                "conv1d": is_conv1d(get_module(self.model, name)),
                **self.edit_method.layer_info(name),
            }

    def _fit(self, W: torch.Tensor, projector):
        """SPHERE's projector for ``W``: a cold fit when the layer has none yet, else a warm refit of a
        copy of ``projector`` (the layer's own stays as it is until the batch succeeds)."""
        if projector is None:
            return self.projector_class.fit(W, self.eta, self.alpha)
        return copy.copy(projector).refit(W)

    def _close_prefit(self) -> None:
        if self._prefit is not None:
            self._prefit.close()
            self._prefit = None

    # -- state -------------------------------------------------------------------
    def edited_weights(self) -> dict[str, torch.Tensor]:
        """Module name -> the edited weight as an [out, in] view (do not modify)."""
        return {name: self._weight(name) for name in self.edited_module_names}

    def state_dict(self) -> dict:
        """Everything needed to resume (tensors on CPU and plain Python values)."""
        layers = {}
        for name in self.edited_module_names:
            entry: dict = dict(self.edit_method.layer_state(name))
            proj = self._projectors.get(name)
            if proj is not None:
                entry["projector"] = proj.state_dict()
            layers[name] = entry
        return {
            "format": STATE_FORMAT,
            "method": self.method,
            "sphere": self.sphere,
            "eta": self.eta,
            "alpha": self.alpha,
            "seed": self.seed,
            "layers_edited": list(self.hparams.layers),
            "hparams": self._hparams_record(),
            "batches_done": self.batches_done,
            "templates": copy.deepcopy(self.templates),
            "base_fingerprint": self._base_fp,
            "stats_keys": dict(self._stats_keys),
            "layers": layers,
            "rng": {"torch": torch.get_rng_state()},
        }

    def _cached_c0(self, name: str, key: str | None) -> torch.Tensor:
        """C0 of the unedited weights from the cache by its key, once the model holds edited ones."""
        c0 = load_cached(self.model, name, key, self.cache_dir) if key else None
        if c0 is None:
            raise RuntimeError(
                f"cannot restore key statistics for {name}: the model no longer holds the unedited weights and the "
                f"cache in {str(self.cache_dir)!r} has no entry {key!r}; load the state into an Editor on the "
                "unedited model"
            )
        return c0

    def _hparams_record(self) -> dict:
        """The settings a resumed run must share (the hparams fields, without bookkeeping keys)."""
        return {k: v for k, v in self.hparams.to_dict().items() if k in HPARAM_FIELDS}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. Call it before loading the edited weights into the model.

        Key statistics are recomputed from the model when it still holds the
        unedited weights, else read from the disk cache by their stored key.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state must be an Editor.state_dict() of format {STATE_FORMAT}")
        for key, mine in (("method", self.method), ("sphere", self.sphere), ("eta", self.eta), ("alpha", self.alpha),
                          ("layers_edited", list(self.hparams.layers))):
            if state[key] != mine:
                raise ValueError(f"state was saved with {key}={state[key]!r}, this Editor has {key}={mine!r}")
        missing = [n for n in self.edited_module_names if n not in state["layers"]]
        if missing:
            raise ValueError(f"state has no entry for edited module(s) {missing}")
        saved, mine = state.get("hparams"), self._hparams_record()  # saved: None in states from before it was kept
        changed = [] if saved is None else sorted(k for k in {*saved, *mine} if saved.get(k) != mine.get(k))
        if changed:
            raise ValueError("state was saved with other hparams: " + "; ".join(
                f"{k}={saved.get(k)!r}, this Editor has {mine.get(k)!r}" for k in changed))
        unedited = weights_fingerprint(self.model) == state["base_fingerprint"]
        if self.edit_method.uses_key_statistics and unedited and state.get("stats_keys"):
            keys = stats_keys(self.model, self.tokenizer, self.edited_module_names, corpus=self.stats_corpus,
                              n_samples=self.hparams.mom2_n_samples, dtype=self.hparams.mom2_dtype,
                              weights_fp=state["base_fingerprint"])
            if keys != state["stats_keys"]:
                raise ValueError(f"state's key statistics came from another corpus or tokenizer than this Editor's "
                                 f"stats_corpus {str(self.stats_corpus)!r}")
        self._templates = copy.deepcopy(state["templates"])
        self._base_fp = state["base_fingerprint"]
        self.edit_method, self._projectors = self._method_class(self.hparams), {}
        if not self.edit_method.uses_key_statistics or unedited:
            self._prepare()
        else:
            c0s = {name: self._cached_c0(name, state["stats_keys"].get(name)) for name in self.edited_module_names}
            self._stats_keys = dict(state["stats_keys"])
            self._set_stats(c0s)
        for name in self.edited_module_names:
            entry = state["layers"][name]
            dev = self._weight(name).device
            self.edit_method.load_layer_state(name, entry, dev)
            if "projector" in entry:
                self._projectors[name] = self.projector_class.from_state_dict(entry["projector"], dev)
        self.batches_done = int(state["batches_done"])
        if "rng" in state and "torch" in state["rng"]:
            torch.set_rng_state(state["rng"]["torch"])


class _Prefit:
    """One batch's SPHERE fits, started when the batch starts on the Editor's fitting thread (on CUDA, in
    its side stream of each weight's device) so that they run while the method computes its targets.

    Each fit reads the batch-start copy of its weight (FT changes the live weight while it trains);
    :meth:`take` hands it over only while the weight still equals that copy."""

    def __init__(self, editor: Editor, snapshot: dict[str, torch.Tensor]):
        self._editor = editor
        self._snapshot = snapshot
        self._projectors = dict(editor._projectors)
        self._done = {name: threading.Event() for name in snapshot}
        self._results: dict[str, object] = {}
        self._streams = {}
        for W in snapshot.values():
            if W.device.type == "cuda" and W.device not in self._streams:
                if W.device not in editor._prefit_streams:
                    editor._prefit_streams[W.device] = torch.cuda.Stream(W.device)
                stream = editor._prefit_streams[W.device]
                stream.wait_stream(torch.cuda.current_stream(W.device))  # the snapshot's copies are done
                self._streams[W.device] = stream
        if editor._prefit_thread is None:
            editor._prefit_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sphere-prefit")
            weakref.finalize(editor, editor._prefit_thread.shutdown, wait=False)
        self._running = editor._prefit_thread.submit(self._run)

    def _run(self) -> None:
        for name, W in self._snapshot.items():
            try:
                stream = self._streams.get(W.device)
                with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                    projector = self._editor._fit(W, self._projectors.get(name))
                    self._results[name] = (projector, stream.record_event() if stream is not None else None)
            except BaseException as exc:  # raised again by take(), in the editing thread
                self._results[name] = exc
            finally:
                self._done[name].set()

    def take(self, name: str, W: torch.Tensor):
        """The layer's projector fitted in the background, or None when ``W`` changed since (fit it again)."""
        if not torch.equal(W, self._snapshot[name]):
            return None
        self._done[name].wait()
        result = self._results[name]
        if isinstance(result, BaseException):
            raise result
        projector, event = result
        if event is not None:
            torch.cuda.current_stream(W.device).wait_event(event)
        return projector

    def close(self) -> None:
        """Wait for the fits; the editing stream then waits for the side streams, so that the batch-start
        copies (freed with the batch) outlive any fit still reading them, used or not."""
        concurrent.futures.wait([self._running])
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)
