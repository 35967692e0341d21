"""run_sequential: batching, callbacks, atomic checkpoints, and bitwise-exact resume."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sphere_fast.editing.editor import Editor
from sphere_fast.editing.hparams import default_hparams
from sphere_fast.harness.sequential import latest_checkpoint, load_checkpoint, prune_checkpoints, run_sequential, \
    save_checkpoint

from tests.editing.fixtures import subject_end_requests, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def editor(tok, cache, method="alphaedit", sphere=True):
    model = tiny_model("llama", tok)
    hp = default_hparams(model, method).replace(mom2_n_samples=64, v_num_grad_steps=4, num_steps=4, lr=1e-2)
    if method == "prune":  # small edited weights: MEMIT's updates pass sigma_max(W0), so the restraint acts
        with torch.no_grad():
            for layer in hp.layers:
                model.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.mul_(0.05)
    return Editor(model, tok, hp, method=method, sphere=sphere, cache_dir=cache, progress=False)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["alphaedit", "memit", "rect", "prune", "ft"])
def test_resume_reproduces_uninterrupted_run(tok, stats_cache, tmp_path, method):
    reqs = subject_end_requests(tok, 6)
    full = editor(tok, stats_cache, method)
    seen = []
    infos = run_sequential(full, reqs, batch_size=2, progress=False,
                           on_batch=lambda b, batch, info: seen.append((b, len(batch), info["batch_size"])))
    assert seen == [(0, 2, 2), (1, 2, 2), (2, 2, 2)] and len(infos) == 3
    if method == "prune":
        assert any(layer["restrained_singular_values"] for info in infos for layer in info["layers"].values())
    expected = {n: p.detach().clone() for n, p in full.model.named_parameters()}

    ckpt = tmp_path / "ckpt"
    first = editor(tok, stats_cache, method)

    def stop_after_second(b, batch, info):
        if b == 1:
            raise Interrupt  # after batch 1 ran, before its checkpoint

    with pytest.raises(Interrupt):
        run_sequential(first, reqs, batch_size=2, checkpoint_every=1, checkpoint_dir=ckpt, on_batch=stop_after_second,
                       progress=False)
    latest = latest_checkpoint(ckpt)
    assert latest is not None and json.loads((latest / "meta.json").read_text())["next_batch"] == 1
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")]

    # A fresh process would rebuild the unedited model and an Editor; resume continues with batch 1.
    resumed = editor(tok, stats_cache, method)
    ran = []
    infos = run_sequential(resumed, reqs, batch_size=2, checkpoint_every=1, checkpoint_dir=ckpt, resume=True,
                           on_batch=lambda b, batch, info: ran.append(b), progress=False)
    assert ran == [1, 2] and len(infos) == 2
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[n]), f"{n} differs after resume"
    assert resumed.batches_done == 3
    assert json.loads((latest_checkpoint(ckpt) / "meta.json").read_text())["next_batch"] == 3
    assert sorted(p.name for p in ckpt.iterdir()) == ["batch-000001", "batch-000002", "batch-000003"]

    # Resuming a finished run edits nothing more.
    assert run_sequential(resumed, reqs, batch_size=2, checkpoint_every=1, checkpoint_dir=ckpt, resume=True,
                          progress=False) == []


def test_resume_continues_a_longer_list_that_begins_with_the_checkpointed_one(tok, stats_cache, tmp_path):
    reqs = subject_end_requests(tok, 6)
    full = editor(tok, stats_cache)
    run_sequential(full, reqs, batch_size=2, progress=False)
    first = editor(tok, stats_cache)
    run_sequential(first, reqs[:4], batch_size=2, checkpoint_every=1, checkpoint_dir=tmp_path / "c", progress=False)
    grown, ran = editor(tok, stats_cache), []
    run_sequential(grown, reqs, batch_size=2, checkpoint_every=1, checkpoint_dir=tmp_path / "c", resume=True,
                   on_batch=lambda b, batch, info: ran.append(b), progress=False)
    assert ran == [2]
    for name, w in grown.edited_weights().items():
        assert torch.equal(w, full.edited_weights()[name]), name

    # A checkpoint whose list ended inside a batch, or another list, does not resume.
    run_sequential(editor(tok, stats_cache), reqs[:3], batch_size=2, checkpoint_every=1,
                   checkpoint_dir=tmp_path / "odd", progress=False)
    for ckpt, longer in ((tmp_path / "odd", reqs), (tmp_path / "c", reqs[1:] + reqs[:1])):
        with pytest.raises(ValueError, match="neither equals nor extends"):
            run_sequential(editor(tok, stats_cache), longer, batch_size=2, checkpoint_every=1, checkpoint_dir=ckpt,
                           resume=True, progress=False)


def test_resume_from_cached_statistics(tok, stats_cache, tmp_path):
    """An Editor built on already-edited weights restores C0 from the disk cache by its stored key."""
    from sphere_fast.harness.sequential import load_checkpoint

    reqs = subject_end_requests(tok, 4)
    ed = editor(tok, stats_cache)
    run_sequential(ed, reqs, batch_size=2, checkpoint_every=1, checkpoint_dir=tmp_path / "c", progress=False)
    expected = {n: w.clone() for n, w in ed.edited_weights().items()}
    other = editor(tok, stats_cache)
    with torch.no_grad():  # the model already carries some edit: its fingerprint is not the base one
        for n, w in other.edited_weights().items():
            w.copy_(expected[n])
    load_checkpoint(other, latest_checkpoint(tmp_path / "c"))
    for n, w in other.edited_weights().items():
        assert torch.equal(w, expected[n])
    assert other.batches_done == 2
    empty = editor(tok, tmp_path / "no-cache")
    with torch.no_grad():
        for n, w in empty.edited_weights().items():
            w.copy_(expected[n])
    with pytest.raises(RuntimeError, match="cannot restore key statistics"):
        load_checkpoint(empty, latest_checkpoint(tmp_path / "c"))


def test_keep_last_prunes_older_checkpoints(tok, stats_cache, tmp_path):
    reqs = subject_end_requests(tok, 6)
    ckpt = tmp_path / "ckpt"
    full = editor(tok, stats_cache)
    run_sequential(full, reqs, batch_size=2, checkpoint_every=1, checkpoint_dir=ckpt, keep_last=2, progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["batch-000002", "batch-000003"]
    # The kept newest checkpoint restores the final state.
    restored = editor(tok, stats_cache)
    assert run_sequential(restored, reqs, batch_size=2, checkpoint_every=1, checkpoint_dir=ckpt, resume=True,
                          keep_last=1, progress=False) == []
    for n, w in restored.edited_weights().items():
        assert torch.equal(w, full.edited_weights()[n])
    assert sorted(p.name for p in ckpt.iterdir()) == ["batch-000002", "batch-000003"]  # nothing new was written


def test_argument_errors(tok, stats_cache, tmp_path):
    ed = editor(tok, stats_cache)
    reqs = subject_end_requests(tok, 2)
    with pytest.raises(ValueError, match="batch_size"):
        run_sequential(ed, reqs, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_sequential(ed, reqs, batch_size=1, checkpoint_every=0, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run_sequential(ed, reqs, batch_size=1, checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match="keep_last"):
        run_sequential(ed, reqs, batch_size=1, checkpoint_every=1, checkpoint_dir=tmp_path, keep_last=0, progress=False)
    run_sequential(ed, reqs, batch_size=1, checkpoint_every=2, checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="batch_size=2"):
        run_sequential(editor(tok, stats_cache), reqs, batch_size=2, checkpoint_dir=tmp_path / "c", resume=True,
                       progress=False)
    with pytest.raises(ValueError, match="request"):
        run_sequential(editor(tok, stats_cache), reqs[::-1], batch_size=1, checkpoint_dir=tmp_path / "c", resume=True,
                       progress=False)


class Crash(Exception):
    pass


# Every step a checkpoint write takes: temporary folder, file writes, modes, renames, deletions.
_STEPS = ((tempfile, "mkdtemp"), (safetensors.torch, "save_file"), (torch, "save"), (Path, "write_text"),
          (os, "chmod"), (os, "rename"), (os, "replace"), (shutil, "rmtree"))


def _stop_at(patch, step: int, kill: bool) -> list[str]:
    """Make the ``step``-th of the calls in ``_STEPS`` raise; with ``kill`` nothing runs after it (no clean-up)."""
    seen, dead = [], []

    def wrap(owner, name):
        real = getattr(owner, name)

        def op(*args, **kwargs):
            if dead and kill:
                return None
            if not dead:
                seen.append(name)
                if len(seen) == step:
                    dead.append(name)
                    raise Crash(f"{name} (step {step})")
            return real(*args, **kwargs)

        patch.setattr(owner, name, op)

    for owner, name in _STEPS:
        wrap(owner, name)
    return seen


@pytest.mark.parametrize("kill", [False, True], ids=["error", "kill"])
@pytest.mark.parametrize("replace", [False, True], ids=["next-batch-and-prune", "same-batch"])
def test_a_checkpoint_write_stopped_at_any_step_leaves_a_complete_checkpoint(tok, stats_cache, tmp_path, monkeypatch,
                                                                              kill, replace):
    """save_checkpoint (and the prune after it) stopped at each step in turn: the newest checkpoint found is
    complete, loads, and holds either the previous state or the new one, never a mixture or nothing."""
    reqs = subject_end_requests(tok, 4)
    ed = editor(tok, stats_cache)
    ed.edit_batch(reqs[:2])
    pristine = tmp_path / "pristine"
    save_checkpoint(ed, pristine, 1, batch_size=2, requests_hash="h")
    before = {n: w.clone() for n, w in ed.edited_weights().items()}
    ed.edit_batch(reqs[2:])
    after = {n: w.clone() for n, w in ed.edited_weights().items()}
    assert any(not torch.equal(before[n], after[n]) for n in before)

    outcomes = set()
    for step in range(1, 100):
        root = tmp_path / f"step-{step}"
        shutil.copytree(pristine, root)
        with monkeypatch.context() as patch:
            seen = _stop_at(patch, step, kill)
            try:
                save_checkpoint(ed, root, 1 if replace else 2, batch_size=2, requests_hash="h")
                if not replace:
                    prune_checkpoints(root, keep_last=1)
            except Crash:
                pass
        latest = latest_checkpoint(root)
        assert latest is not None, f"no checkpoint after a stop at step {step} ({seen[-1]})"
        reader = editor(tok, stats_cache)
        meta = load_checkpoint(reader, latest)
        state = "new" if all(torch.equal(w, after[n]) for n, w in reader.edited_weights().items()) else "old"
        expected = before if state == "old" else after
        assert all(torch.equal(w, expected[n]) for n, w in reader.edited_weights().items()), f"step {step}"
        assert meta["next_batch"] == (1 if replace or state == "old" else 2)
        outcomes.add(state)
        # The next write goes through whatever the stop left behind.
        save_checkpoint(ed, root, 1 if replace else 2, batch_size=2, requests_hash="h")
        assert json.loads((latest_checkpoint(root) / "meta.json").read_text())["next_batch"] == (1 if replace else 2)
        if len(seen) < step:  # the write finished before this step: every step has been stopped once
            break
    assert step > 8 and outcomes == {"old", "new"}
