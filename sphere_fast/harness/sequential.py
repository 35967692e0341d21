"""Sequential editing in batches, with atomic checkpoints and exact resume.

A checkpoint is a folder ``<checkpoint_dir>/batch-<next:06d>/`` holding
``weights.safetensors`` (the edited weights, [out, in] oriented),
``editor.pt`` (:meth:`Editor.state_dict`) and ``meta.json`` (next batch index,
batch size, a hash of the request list). It is written to a temporary folder
and renamed into place (:func:`sphere_fast.files.atomic_folder`), so a crash
never leaves a half-written checkpoint; one that replaces a checkpoint of the
same batch renames the old one aside first, and :func:`latest_checkpoint`
finds it there if the crash came before the new one was renamed in.
Each holds d x d state (``cache_c``) per AlphaEdit layer, about 0.8 GB per layer
at Llama3-8B's d = 14336: ``keep_last`` prunes older checkpoints once a newer
one is in place (default: keep all).
Resuming loads the newest one and continues with the next batch; the final
weights equal those of an uninterrupted run bit for bit on CPU. A checkpoint
also resumes a longer list that begins with the one it was written for (a
study whose horizon grew), as long as it holds whole batches of that list.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import files
from .._validation import check_positive_int
from ..editing.requests import EditRequest

CHECKPOINT_PREFIX = "batch-"


def _request_bytes(r: EditRequest) -> bytes:
    return repr((r.prompt, r.subject, r.target_new, r.case_id)).encode()


def _requests_hash(requests: Sequence[EditRequest]) -> str:
    h = hashlib.sha256()
    for r in requests:
        h.update(_request_bytes(r))
    return h.hexdigest()[:16]


def _prefix_edited(requests: Sequence[EditRequest], requests_hash: str, edited: int) -> bool:
    """Whether ``requests`` begins with the request list whose hash is ``requests_hash``, and that list
    reaches at least ``edited`` requests (the checkpoint's whole batches are the same requests here)."""
    h = hashlib.sha256()
    for n, r in enumerate(requests, 1):
        h.update(_request_bytes(r))
        if n >= edited and h.hexdigest()[:16] == requests_hash:
            return True
    return False


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = _checkpoints(root)
    return found[-1] if found else None


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (a replaced one's aside copy stands in for it)."""
    names = set()
    for p in root.iterdir():
        name = p.name
        if name.startswith(".") and name.endswith(files.ASIDE_SUFFIX):  # an aside copy (files.aside_path)
            name = name[1:-len(files.ASIDE_SUFFIX)]
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
            names.add(name)
    found = [files.current_folder(root / name) for name in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX):]))]
    return [p for p in found if p is not None and (p / "meta.json").exists()]


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted folders."""
    doomed = _checkpoints(Path(checkpoint_dir))[:-keep_last]
    for path in doomed:
        files.remove_folder(path)
    return doomed


def save_checkpoint(editor, checkpoint_dir: str | Path, next_batch: int, *, batch_size: int,
                    requests_hash: str) -> Path:
    from safetensors.torch import save_file

    final = Path(checkpoint_dir) / f"{CHECKPOINT_PREFIX}{next_batch:06d}"
    with files.atomic_folder(final) as tmp:
        weights = {name: w.detach().cpu().contiguous() for name, w in editor.edited_weights().items()}
        save_file(weights, str(tmp / "weights.safetensors"))
        torch.save({"editor": editor.state_dict(), "rng": _rng_states()}, tmp / "editor.pt")
        meta = {"next_batch": next_batch, "batch_size": batch_size, "requests_hash": requests_hash,
                "modules": list(weights)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete
    return final


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The edited weights a checkpoint folder holds, by module name, as the Editor orients them."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "weights.safetensors"))


def load_checkpoint(editor, path: str | Path) -> dict:
    """Restore editor state and edited weights from a checkpoint folder; returns its meta."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    blob = torch.load(path / "editor.pt", map_location="cpu", weights_only=True)
    editor.load_state_dict(blob["editor"])  # before the weights: statistics come from the unedited model
    weights = checkpoint_weights(path)
    current = editor.edited_weights()
    if set(weights) != set(current):
        raise ValueError(f"checkpoint {str(path)!r} holds modules {sorted(weights)}, the editor edits {sorted(current)}")
    with torch.no_grad():
        for name, w in weights.items():
            if tuple(w.shape) != tuple(current[name].shape):
                raise ValueError(f"checkpoint {str(path)!r}: {name} has shape {tuple(w.shape)}, "
                                 f"the model has {tuple(current[name].shape)}")
            current[name].copy_(w.to(current[name].device, current[name].dtype))
    _set_rng_states(blob["rng"])
    return meta


def run_sequential(editor, requests: Sequence[EditRequest], *, batch_size: int, checkpoint_every: int | None = None,
                   checkpoint_dir: str | Path | None = None, resume: bool = False, keep_last: int | None = None,
                   on_batch: Callable[[int, list, dict], None] | None = None, progress: bool = True,
                   should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Edit ``requests`` in consecutive batches; returns the infos of the batches run in this call.

    ``on_batch(batch_index, batch_requests, info)`` is called after each batch.
    Every ``checkpoint_every`` batches (and after the last one) a checkpoint is
    written to ``checkpoint_dir``; ``resume=True`` continues from the newest one.
    ``keep_last`` (None: all) deletes older checkpoints after each new one is written.
    ``should_stop()`` is asked after each checkpoint: True ends the call there
    (a time budget); a later call with ``resume=True`` continues.
    """
    requests = list(requests)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(checkpoint_every, "checkpoint_every", none_ok=True)
    check_positive_int(keep_last, "keep_last", none_ok=True)
    if (checkpoint_every is not None or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_dir is required with checkpoint_every or resume")
    if not requests:
        return []
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    req_hash = _requests_hash(requests)
    start = 0
    if resume:
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is not None:
            meta = json.loads((ckpt / "meta.json").read_text())
            same = meta["requests_hash"] == req_hash or _prefix_edited(
                requests, meta["requests_hash"], int(meta["next_batch"]) * batch_size)
            if meta["batch_size"] != batch_size or not same:
                raise ValueError(
                    f"checkpoint {str(ckpt)!r} was written for batch_size={meta['batch_size']} and a request list "
                    f"(hash {meta['requests_hash']}) that this one (batch_size={batch_size}, hash {req_hash}) "
                    "neither equals nor extends by whole batches"
                )
            load_checkpoint(editor, ckpt)
            start = int(meta["next_batch"])
    infos = []
    indices = range(start, len(batches))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="editing", unit="batch", initial=start, total=len(batches))
    for b in indices:
        info = editor.edit_batch(batches[b])
        infos.append(info)
        if on_batch is not None:
            on_batch(b, batches[b], info)
        done = b + 1
        if checkpoint_every is not None and (done % checkpoint_every == 0 or done == len(batches)):
            save_checkpoint(editor, checkpoint_dir, done, batch_size=batch_size, requests_hash=req_hash)
            if keep_last is not None:
                prune_checkpoints(checkpoint_dir, keep_last)
            if should_stop is not None and done < len(batches) and should_stop():
                break
    return infos
