"""Module lookup, weight orientation, hooks and weight fingerprints.

Orientation: every edit works on ``W`` as ``[out_features, in_features]`` (rows
are output neurons; ``y = W k``). ``nn.Linear`` stores exactly that. GPT-2's
``Conv1D`` stores ``[in, out]`` (``y = k W``), so its oriented view is
``weight.T``. The choice is made from the module type, never from the shape
(a square weight would otherwise be ambiguous).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model {type(model).__name__} has no module {name!r} (check the hparams templates)") from None


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return isinstance(module, Conv1D)


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` view that writes through to the parameter."""
    if is_conv1d(module):
        return module.weight.data.T
    if isinstance(module, nn.Linear):
        return module.weight.data
    raise TypeError(f"edited module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def hidden_of(output):
    """Hidden states from a decoder layer's output (bare tensor in transformers 5, tuple before)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


class _StopForward(Exception):
    """Raised by a hook to end a forward once everything needed has been recorded."""


@contextlib.contextmanager
def trace(model: nn.Module, names: Iterable[str], *, inputs: bool = False, outputs: bool = True,
          edit: Callable[[str, torch.Tensor], torch.Tensor] | None = None, stop: bool = False):
    """Record inputs/outputs of the named modules during forwards in the block.

    Yields a dict ``name -> {"input": tensor, "output": tensor}`` (hidden states
    only). ``edit(name, hidden)`` may return a replacement output hidden state.
    ``stop=True`` ends the forward as soon as every named module has been
    recorded (inputs only: before the last module runs), so the layers and the
    LM head after it are never computed; the model call in the block then
    returns nothing and the block ends there.
    """
    records: dict[str, dict] = {}
    pending = set(names)
    handles = []

    def done(name):
        pending.discard(name)
        if stop and not pending:
            raise _StopForward

    def make_pre_hook(name):
        def hook(module, args, kwargs):
            records.setdefault(name, {})["input"] = args[0] if args else next(iter(kwargs.values()))
            done(name)

        return hook

    def make_hook(name):
        def hook(module, args, kwargs, output):
            rec = records.setdefault(name, {})
            if inputs:
                rec["input"] = args[0] if args else next(iter(kwargs.values()))
            hidden = hidden_of(output)
            if edit is not None:
                new = edit(name, hidden)
                if new is not None and new is not hidden:
                    output = _replace_hidden(output, new)
                    hidden = new
            if outputs:
                rec["output"] = hidden
            done(name)
            return output

        return hook

    try:
        for name in dict.fromkeys(names):
            module = get_module(model, name)
            if inputs and not outputs and edit is None:
                handles.append(module.register_forward_pre_hook(make_pre_hook(name), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield records
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


class _StandIn(nn.Module):
    """Stands for a decoder layer whose output is known.

    ``passthrough`` layers return their incoming hidden states (their output is
    never used: a later stand-in returns the real value); the last one returns
    ``hidden`` (settable between forwards) in the structure of the layer's real
    output ``template``. Other attributes (e.g. ``attention_type``) come from
    the original layer, which decoder loops may read.
    """

    def __init__(self, original: nn.Module, template, hidden: torch.Tensor | None, passthrough: bool):
        super().__init__()
        self.__dict__["_original"] = original  # not a submodule: no second copy of its parameters
        self.__dict__["_template"] = template
        self.__dict__["hidden"] = hidden
        self.passthrough = passthrough

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args, **kwargs):
        if self.passthrough:
            hidden = args[0] if args else kwargs["hidden_states"]
        else:
            hidden = self.__dict__["hidden"]
        return _replace_hidden(self.__dict__["_template"], hidden)


def _layer_list(model: nn.Module, layer_tmp: str, last: int):
    """The ``ModuleList`` holding layers ``0..last`` and their indices in it, or None when they are not in one."""
    names = [layer_tmp.format(i) for i in range(last + 1)]
    parents = {name.rpartition(".")[0] for name in names}
    indices = [name.rpartition(".")[2] for name in names]
    container = get_module(model, parents.pop()) if len(parents) == 1 else None
    if not isinstance(container, nn.ModuleList) or not all(i.isdigit() for i in indices):
        return None
    return container, [int(i) for i in indices]


@contextlib.contextmanager
def stand_in_lower_layers(model: nn.Module, layer_tmp: str, last: int, template, hidden: torch.Tensor | None = None):
    """Replace layers ``0..last`` by stand-ins while the block is open: the lower ones pass their
    input through, layer ``last`` returns ``hidden`` (in the structure of its recorded output
    ``template``). Yields layer ``last``'s stand-in (set its ``hidden`` between forwards), or None
    (and replaces nothing) when the layers are not items of one ``ModuleList``.
    """
    found = _layer_list(model, layer_tmp, last)
    if found is None:
        yield None
        return
    container, indices = found
    originals = [container[i] for i in indices]
    stand_ins = [_StandIn(layer, template, hidden if k == last else None, passthrough=k < last)
                 for k, layer in enumerate(originals)]
    try:
        for i, stand_in in zip(indices, stand_ins):
            container[i] = stand_in
        yield stand_ins[-1]
    finally:
        for i, layer in zip(indices, originals):
            container[i] = layer


def weights_fingerprint(model: nn.Module, *, samples_per_tensor: int = 4096) -> str:
    """A hash that identifies the weights: names, shapes, dtypes and a strided sample of every tensor.

    Cheap (a few thousand values per tensor) yet any real training or edit
    changes it; ``_name_or_path`` is not used (it is empty for models built from a config).
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel() == 0 or t.device.type == "meta" or not t.is_floating_point():
                continue
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step].float().cpu()
            # Whole-tensor reductions catch changes between sampled entries; the
            # dtype argument accumulates in float64 without a float64 copy.
            full = torch.stack([flat.sum(dtype=torch.float64),
                                torch.linalg.vector_norm(flat, dtype=torch.float64)]).cpu()
            h.update(sample.numpy().tobytes())
            h.update(full.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    probe = "The quick brown fox, Danielle Darrieux, 1e-1 <unk> \u00e9t\u00e9."
    ids = tok(probe)["input_ids"]
    return hashlib.sha256(f"{type(tok).__name__}|{len(tok)}|{ids}".encode()).hexdigest()[:16]


def pad_token_id(tokenizer) -> int:
    """The id used for right padding: pad, else eos, else 0 (padded positions are masked)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def right_pad(seqs: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, right-padded: real tokens first, so indices into each sequence stay valid."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def model_device(model) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (sharded models too)."""
    return model.get_input_embeddings().weight.device
