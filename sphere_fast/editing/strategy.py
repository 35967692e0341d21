"""What differs between editing methods: the :class:`EditMethod` interface.

The :class:`~.editor.Editor` owns what every method shares: request checks, the
key statistics C0, all-or-nothing batches, SPHERE's projection of an update and
its addition (:meth:`Batch.apply`), timing and saved state. A method says how
the updates of a batch are computed (:meth:`EditMethod.run_batch`), what it
does to an update before the projection, what it keeps across batches and how
that is saved. :class:`LocateThenEdit` is the loop MEMIT, AlphaEdit, RECT and
PRUNE share; they differ only in their closed form, their hooks and the order
in which the loop applies their updates (``update_order``, as each method's
public code does).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from .compute import compute_keys, layer_outputs
from .hparams import EditHparams
from .requests import EditRequest
from .targets import TargetPlan, compute_targets


@dataclass
class Batch:
    """One batch as a method sees it. ``apply(name, delta)`` projects (with SPHERE) and adds an update to
    the edited module's ``[out, in]`` weight and returns that layer's info; ``timed(part)`` times a block."""

    model: object
    tokenizer: object
    hparams: EditHparams
    requests: list[EditRequest]
    templates: list[list[str]]
    module_names: list[str]
    weight: Callable[[str], torch.Tensor]
    apply: Callable[[str, torch.Tensor], dict]
    timed: Callable[[str], contextlib.AbstractContextManager]


class EditMethod:
    """One editing method. Subclasses set ``name`` and ``default_alpha`` (SPHERE's alpha from the paper)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # as papers write it, for tables and figures
    default_alpha: ClassVar[float] = 0.8
    uses_key_statistics: ClassVar[bool] = True
    uses_target_values: ClassVar[bool] = True  # needs hparams.v_loss_layer

    def __init__(self, hparams: EditHparams):
        self.hparams = hparams

    # -- state across batches --------------------------------------------------------------------
    def has_key_statistics(self, name: str) -> bool:
        return True

    def set_key_statistics(self, name: str, C0: torch.Tensor) -> None:
        """C0 of an edited module, on its device (from the unedited model, once)."""

    def start(self, name: str, W: torch.Tensor) -> None:
        """Called before each batch with the live weight; e.g. to remember the unedited weight."""

    def layer_state(self, name: str) -> dict:
        """Tensors and plain values to save for a layer (merged into the Editor's layer entry)."""
        return {}

    def load_layer_state(self, name: str, entry: dict, device: torch.device) -> None:
        """Restore what :meth:`layer_state` saved."""

    # -- one batch ---------------------------------------------------------------------------------
    def run_batch(self, batch: Batch) -> dict:
        """Compute and apply (through ``batch.apply``) every layer's update; return the batch info."""
        raise NotImplementedError

    def before_projection(self, name: str, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The update as it goes into the projection (or is added, without SPHERE)."""
        return delta

    def layer_info(self, name: str) -> dict:
        """Method-specific entries of a layer's info."""
        return {}


class LocateThenEdit(EditMethod):
    """The official code's loop: target values at the last edited layer, then per layer in ascending
    order keys on the current model, the residual spread over the remaining layers and the closed form.

    ``update_order`` (hparams, else the method's ``default_update_order``) says what the layers above see:
    "after_layers" (MEMIT's public code, and RECT's and PRUNE's on it): each layer's raw closed-form
    update is added before the next layer's keys; after the last layer the weights are put back and
    every update goes through ``before_projection`` and SPHERE (``batch.apply``), each fitted on its
    layer's batch-start weight. "per_layer" (AlphaEdit's public code): each layer's final update
    (through ``batch.apply``) is applied before the next layer's keys. Without a ``before_projection``
    change and without SPHERE the two give the same weights, bit for bit.
    """

    default_update_order: ClassVar[str] = "per_layer"

    @property
    def update_order(self) -> str:
        return self.hparams.update_order or self.default_update_order

    def layer_update(self, name: str, K: torch.Tensor, R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The closed-form update ``[d_out, d_in]`` from keys K ``[d_in, n]`` and residuals R ``[d_out, n]``."""
        raise NotImplementedError

    def after_layers(self, batch: Batch) -> None:
        """After every layer has been updated (AlphaEdit's cache_c); must not fail after changing state."""

    def run_batch(self, batch: Batch) -> dict:
        hp, model, tok, requests = batch.hparams, batch.model, batch.tokenizer, batch.requests
        z_layer = hp.layers[-1]
        with batch.timed("targets"):
            results = compute_targets(model, tok, requests, TargetPlan.from_hparams(hp), batch.templates)
            zs = torch.stack([r.z for r in results])  # [n, hidden]
        with torch.no_grad():
            before = float((zs - layer_outputs(model, tok, requests, hp, z_layer).to(zs.device)).norm(dim=1).mean())

        layers_info: dict[str, dict] = {}
        raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # after_layers: name -> (batch-start W, update)
        with torch.no_grad():
            for i, name in enumerate(batch.module_names):
                W = batch.weight(name)
                dev = W.device
                with batch.timed("keys"):
                    K = compute_keys(model, tok, requests, hp, [name], batch.templates)[name].to(dev).T  # [d_in, n]
                    cur = layer_outputs(model, tok, requests, hp, z_layer).to(dev)
                    R = (zs.to(dev) - cur).T / (len(hp.layers) - i)  # [hidden, n]
                with batch.timed("solve"):
                    delta = self.layer_update(name, K, R, W)
                if self.update_order == "per_layer":
                    layers_info[name] = batch.apply(name, delta)
                else:
                    raw[name] = (W.clone(), delta)
                    W.add_(delta.to(W.dtype))  # what the layers above see, as in the public MEMIT code
            for name, (start, delta) in raw.items():
                batch.weight(name).copy_(start)
                layers_info[name] = batch.apply(name, delta)
            after = float((zs - layer_outputs(model, tok, requests, hp, z_layer).to(zs.device)).norm(dim=1).mean())
            self.after_layers(batch)  # last: a failure before it leaves the method's state as it was
        return {
            "layers": layers_info,
            "z_residual_before": before,
            "z_residual_after": after,
            "target_nll_before": [r.nll_before for r in results],
            "target_nll_after": [r.nll_after for r in results],
        }
