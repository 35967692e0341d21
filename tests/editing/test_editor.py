"""The Editor on tiny in-process models: efficacy, exactness, ordering, transactions, errors.

Requests end at the subject and have single-token targets: a random tiny
model cannot move information past the subject (docs/editing.md), so these
are the prompts on which efficacy can be measured at all.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from sphere_fast.editing.alphaedit import alphaedit_update, nullspace_projector
from sphere_fast.editing.compute import compute_keys, layer_outputs
from sphere_fast.editing.editor import Editor
from sphere_fast.editing.hparams import default_hparams
from sphere_fast.editing.memit import memit_update
from sphere_fast.editing.model_utils import get_module, oriented_weight
from sphere_fast.editing.requests import EditRequest
from sphere_fast.editing.targets import TargetPlan, compute_targets
from sphere_fast.projector import SphereProjector

from .fixtures import (
    counterfact_requests,
    subject_end_requests,
    teacher_forced_top1,
    tiny_model,
    tiny_tokenizer,
)

N_SAMPLES = 64  # C0 from 64 WikiText lines (~8k tokens): enough for a 512-d key space


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


def hparams(model, method, **changes):
    return default_hparams(model, method).replace(mom2_n_samples=N_SAMPLES, **changes)


def make_editor(model, tok, cache, method, **kw):
    hp_changes = kw.pop("hp", {})
    return Editor(model, tok, hparams(model, method, **hp_changes), method=method, cache_dir=cache, progress=False, **kw)


def params_copy(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "method, sphere",
    [("memit", False), ("alphaedit", False), ("alphaedit", True)],
    ids=["memit", "alphaedit", "alphaedit+sphere"],
)
def test_two_batches_reach_efficacy(tok, cache, method, sphere):
    model = tiny_model("llama", tok)
    before = params_copy(model)
    reqs = subject_end_requests(tok, 20)
    assert teacher_forced_top1(model, tok, reqs) <= 0.1
    ed = make_editor(model, tok, cache, method, sphere=sphere)
    infos = [ed.edit_batch(reqs[:10]), ed.edit_batch(reqs[10:])]
    top1 = teacher_forced_top1(model, tok, reqs)
    assert top1 >= 0.8, f"{method} sphere={sphere}: top-1 efficacy {top1:.2f}"
    for info in infos:
        assert info["batch_size"] == 10
        assert info["z_residual_before"] >= 3 * info["z_residual_after"], info
        assert set(info["layers"]) == set(ed.edited_module_names)
        for layer in info["layers"].values():
            assert (layer["rank"] is not None) == sphere
            assert layer["update_norm"] > 0 and layer["projected_norm"] > 0
            if sphere:  # the projection is a contraction
                assert layer["projected_norm"] <= layer["update_norm"] * (1 + 1e-5)
        assert info["seconds"]["total"] >= info["seconds"]["targets"] > 0
    # Only the edited weights moved, and those did.
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in ed.edited_module_names:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    print(f"\n{method}{'+sphere' if sphere else ''}: top-1 {top1:.2f}; z residual "
          + ", ".join(f"{i['z_residual_before']:.3f}->{i['z_residual_after']:.3f}" for i in infos))


def small(tok, n, offset=0):
    return subject_end_requests(tok, n, offset=offset)


FAST = {"v_num_grad_steps": 4}


def test_sphere_off_is_the_base_method(tok, cache):
    """sphere=False equals AlphaEdit written out by hand, and SPHERE with alpha=0 equals it bit for bit."""
    reqs = small(tok, 6)
    runs = {}
    for label, kw in {"off": {"sphere": False}, "alpha0": {"sphere": True, "alpha": 0.0}}.items():
        model = tiny_model("llama", tok)
        ed = make_editor(model, tok, cache, "alphaedit", hp=FAST, **kw)
        ed.edit_batch(reqs[:3])
        ed.edit_batch(reqs[3:])
        runs[label] = {n: w.clone() for n, w in ed.edited_weights().items()}
    for name in runs["off"]:
        assert torch.equal(runs["off"][name], runs["alpha0"][name]), name

    # The same two batches written out from the building blocks.
    model = tiny_model("llama", tok)
    hp = hparams(model, "alphaedit", **FAST)
    ref = make_editor(model, tok, cache, "alphaedit", hp=FAST, sphere=False)
    templates = ref.templates
    names = ref.edited_module_names
    P = {n: nullspace_projector(ref.key_statistics(n), hp.nullspace_threshold)[0] for n in names}
    cache_c = {n: torch.zeros(512, 512) for n in names}
    for batch in (reqs[:3], reqs[3:]):
        zs = torch.stack([r.z for r in compute_targets(model, tok, batch, TargetPlan.from_hparams(hp), templates)])
        for i, name in enumerate(names):
            K = compute_keys(model, tok, batch, hp, [name], templates)[name].T
            R = (zs - layer_outputs(model, tok, batch, hp, hp.layers[-1])).T / (len(names) - i)
            with torch.no_grad():
                oriented_weight(get_module(model, name)).add_(alphaedit_update(K, R, P[name], cache_c[name], hp.L2).float())
        Ks = compute_keys(model, tok, batch, hp, names, templates)
        for name in names:
            cache_c[name] += Ks[name].T @ Ks[name]
    for name in names:
        assert torch.equal(oriented_weight(get_module(model, name)), runs["off"][name]), name


def test_update_order_after_layers_is_the_public_memit_code(tok, cache):
    """MEMIT + SPHERE (update_order "after_layers", MEMIT's default) equals the public code written out by hand:
    each layer's raw update is added for the layers above, then the weights go back and every update is
    projected on its layer's batch-start weight. "per_layer" gives other weights with SPHERE and the same
    weights, bit for bit, without it."""
    reqs = small(tok, 6)
    runs = {}
    for sphere, order in [(True, None), (True, "per_layer"), (False, None), (False, "per_layer")]:
        model = tiny_model("llama", tok)
        ed = make_editor(model, tok, cache, "memit", hp={**FAST, "update_order": order}, sphere=sphere, eta=0.5,
                         alpha=0.8)
        ed.edit_batch(reqs[:3])
        ed.edit_batch(reqs[3:])
        runs[sphere, order] = {n: w.clone() for n, w in ed.edited_weights().items()}
    for name in runs[False, None]:
        assert torch.equal(runs[False, None][name], runs[False, "per_layer"][name]), name
        assert not torch.equal(runs[True, None][name], runs[True, "per_layer"][name]), name

    model = tiny_model("llama", tok)
    hp = hparams(model, "memit", **FAST)
    ref = make_editor(model, tok, cache, "memit", hp=FAST, sphere=False)
    names, templates = ref.edited_module_names, ref.templates
    C0 = {n: ref.key_statistics(n) for n in names}
    projectors = {}
    for batch in (reqs[:3], reqs[3:]):
        zs = torch.stack([r.z for r in compute_targets(model, tok, batch, TargetPlan.from_hparams(hp), templates)])
        updates = {}
        for i, name in enumerate(names):
            K = compute_keys(model, tok, batch, hp, [name], templates)[name].T
            R = (zs - layer_outputs(model, tok, batch, hp, hp.layers[-1])).T / (len(names) - i)
            W = oriented_weight(get_module(model, name))
            updates[name] = (W.clone(), memit_update(K, R, C0[name], hp.mom2_update_weight))
            with torch.no_grad():
                W.add_(updates[name][1].float())
        for name, (start, delta) in updates.items():
            W = oriented_weight(get_module(model, name))
            with torch.no_grad():
                W.copy_(start)
                old = projectors.get(name)
                projectors[name] = SphereProjector.fit(W, 0.5, 0.8) if old is None else copy.copy(old).refit(W)
                projectors[name].apply_(W, delta.float())
    for name in names:
        assert torch.equal(oriented_weight(get_module(model, name)), runs[True, None][name]), name


def recording_projector(events: list, ptr_to_name: dict):
    """A SphereProjector that records each fit, refit (with the weight it saw) and apply, by layer name."""

    class Recording(SphereProjector):
        @classmethod
        def fit(cls, W, *a, **k):
            events.append(("fit", ptr_to_name[W.data_ptr()], W.clone()))
            return super().fit(W, *a, **k)

        def refit(self, W, *a, **k):
            events.append(("refit", ptr_to_name[W.data_ptr()], W.clone()))
            return super().refit(W, *a, **k)

        def apply_(self, W, B):
            events.append(("apply", ptr_to_name[W.data_ptr()]))
            return super().apply_(W, B)

    return Recording


def test_sphere_layer_order(tok, cache):
    """Per layer, ascending: fit/refit on the current W, apply, then the next layer."""
    events, ptr_to_name = [], {}
    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, cache, "alphaedit", hp=FAST, sphere=True,
                     projector=recording_projector(events, ptr_to_name))
    n1, n2 = ed.edited_module_names
    ptr_to_name.update({w.data_ptr(): n for n, w in ed.edited_weights().items()})
    initial = {n: w.clone() for n, w in ed.edited_weights().items()}
    reqs = small(tok, 4)
    ed.edit_batch(reqs[:2])
    after_first = {n: w.clone() for n, w in ed.edited_weights().items()}
    ed.edit_batch(reqs[2:])
    kinds = [(e[0], e[1]) for e in events]
    assert kinds == [("fit", n1), ("apply", n1), ("fit", n2), ("apply", n2),
                     ("refit", n1), ("apply", n1), ("refit", n2), ("apply", n2)]
    # Projectors are fitted on the live, current weight: batch 2 sees batch 1's updates.
    refits = [e for e in events if e[0] == "refit"]
    for _, name, W in refits:
        assert torch.equal(W, after_first[name])
    fits = [e for e in events if e[0] == "fit"]
    assert torch.equal(fits[0][2], initial[n1]) and not torch.equal(fits[0][2], after_first[n1])
    assert all(type(p).__name__ == "Recording" for p in ed._projectors.values())


def test_key_statistics_are_never_computed_on_edited_weights(tok, tmp_path):
    """After an edit C0 comes only from the cache (the unedited weights' entry); without it, an error."""
    import shutil

    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, tmp_path / "stats", "memit", hp=FAST)
    name = ed.edited_module_names[0]
    unedited = ed.key_statistics(name).clone()
    ed.edit_batch(small(tok, 2))
    assert torch.equal(ed.key_statistics(name), unedited)
    shutil.rmtree(tmp_path / "stats")
    with pytest.raises(RuntimeError, match="no longer holds the unedited weights"):
        ed.key_statistics(name)
    assert not (tmp_path / "stats").exists()


def test_nullspace_property(tok, cache):
    """AlphaEdit's update annihilates C0's directions above the threshold (chosen relative to the spectrum)."""
    model = tiny_model("llama", tok)
    probe = make_editor(model, tok, cache, "alphaedit", hp=FAST, sphere=False)
    name = probe.edited_module_names[0]
    c0 = probe.key_statistics(name).double()
    values, vectors = torch.linalg.eigh(c0)
    threshold = float(values.median())
    ed = make_editor(model, tok, cache, "alphaedit", hp={**FAST, "nullspace_threshold": threshold}, sphere=False)
    before = {n: w.clone() for n, w in ed.edited_weights().items()}
    info = ed.edit_batch(small(tok, 4))
    kept = vectors[:, values >= threshold]
    assert info["layers"][name]["nullspace_dim"] == int((values < threshold).sum())
    for n, w in ed.edited_weights().items():
        delta = (w - before[n]).double()
        assert delta.norm() > 0
        c = ed.key_statistics(n).double()
        vals, vecs = torch.linalg.eigh(c)
        kept = vecs[:, vals >= threshold]
        # fp32 weights: the update is stored with ~1e-7 relative rounding.
        assert (delta @ kept).norm() <= 1e-5 * delta.norm(), n
        null = vecs[:, vals < threshold]
        assert (delta @ null).norm() >= 0.99 * delta.norm()


class FailingProjector(SphereProjector):
    """Fails at the ``fail_at``-th apply (counted over the class), after the earlier layers were updated."""

    applies = 0
    fail_at = 0

    def apply_(self, W, B):
        FailingProjector.applies += 1
        if FailingProjector.applies == FailingProjector.fail_at:
            raise RuntimeError("injected failure in the second layer")
        return super().apply_(W, B)


def test_failed_batch_leaves_no_trace(tok, cache):
    """A failure in the second layer restores every weight and the projectors; a retry equals a clean run."""
    reqs = small(tok, 4)
    clean_model = tiny_model("llama", tok)
    clean = make_editor(clean_model, tok, cache, "alphaedit", hp=FAST, sphere=True)
    clean.edit_batch(reqs[:2])
    clean.edit_batch(reqs[2:])

    model = tiny_model("llama", tok)
    FailingProjector.applies, FailingProjector.fail_at = 0, 4  # batch 1: applies 1-2; batch 2: fails at its second
    ed = make_editor(model, tok, cache, "alphaedit", hp=FAST, sphere=True, projector=FailingProjector)
    ed.edit_batch(reqs[:2])
    before = params_copy(model)
    state = ed.state_dict()
    with pytest.raises(RuntimeError, match="injected"):
        ed.edit_batch(reqs[2:])
    assert FailingProjector.applies == 4
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    after_state = ed.state_dict()
    assert after_state["batches_done"] == state["batches_done"] == 1
    for n in ed.edited_module_names:
        assert torch.equal(after_state["layers"][n]["cache_c"], state["layers"][n]["cache_c"])
        assert torch.equal(after_state["layers"][n]["projector"]["basis"], state["layers"][n]["projector"]["basis"])
    ed.edit_batch(reqs[2:])
    for n, w in ed.edited_weights().items():
        assert torch.equal(w, clean.edited_weights()[n]), n


def test_failure_after_the_last_layer_keeps_cache_c(tok, cache, monkeypatch):
    """A batch that fails after every layer was updated (its last forward) leaves AlphaEdit's cache_c as it was."""
    from sphere_fast.editing import strategy

    reqs = small(tok, 4)
    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, cache, "alphaedit", hp=FAST)
    real, calls = strategy.layer_outputs, []

    def counted(*a, **k):
        calls.append(1)
        if fail_at and len(calls) == fail_at:
            raise RuntimeError("injected failure in the last forward")
        return real(*a, **k)

    monkeypatch.setattr(strategy, "layer_outputs", counted)
    fail_at = 0
    ed.edit_batch(reqs[:2])
    fail_at, calls[:] = len(calls), []  # the same forwards, the last one fails
    before, state = params_copy(model), ed.state_dict()
    with pytest.raises(RuntimeError, match="last forward"):
        ed.edit_batch(reqs[2:])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for n in ed.edited_module_names:
        assert torch.equal(ed.state_dict()["layers"][n]["cache_c"], state["layers"][n]["cache_c"]), n


@pytest.mark.parametrize("sphere", [False, True])
def test_non_finite_update_is_a_collapse(tok, cache, monkeypatch, sphere):
    """A NaN update is the method's divergence (EditCollapsed), with or without SPHERE; nothing changes."""
    from sphere_fast.editing.editor import EditCollapsed
    from sphere_fast.editing.memit import MEMIT

    reqs = small(tok, 2)
    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, cache, "memit", hp=FAST, sphere=sphere)
    real = MEMIT.layer_update
    monkeypatch.setattr(MEMIT, "layer_update", lambda self, *a: real(self, *a) * float("nan"))
    before = params_copy(model)
    with pytest.raises(EditCollapsed, match="NaN/Inf"):
        ed.edit_batch(reqs)
    assert ed.batches_done == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


class RefitFails(SphereProjector):
    """A projector whose warm refit (the second batch's fits) fails."""

    def refit(self, W, *a, **k):
        raise FloatingPointError("injected refit failure")


class ThreadRecording(SphereProjector):
    """Records the thread of every fit and refit."""

    threads: list[str] = []

    seen: list[threading.Thread] = []  # the threads themselves: an ident may be reused once one ends

    @classmethod
    def fit(cls, W, *a, **k):
        cls.threads.append(threading.current_thread().name)
        cls.seen.append(threading.current_thread())
        return super().fit(W, *a, **k)

    def refit(self, W, *a, **k):
        ThreadRecording.threads.append(threading.current_thread().name)
        ThreadRecording.seen.append(threading.current_thread())
        return super().refit(W, *a, **k)


def nudged(editor, name):
    """Make ``editor`` change ``name``'s weight after the batch starts, before its update (as a method could)."""
    run = editor.edit_method.run_batch

    def run_batch(batch):
        with torch.no_grad():
            W = editor.edited_weights()[name]
            W.add_(1e-3 * torch.linspace(-1, 1, W.numel(), device=W.device).reshape(W.shape).to(W.dtype))
        return run(batch)

    editor.edit_method.run_batch = run_batch
    return editor


@pytest.mark.parametrize("method", ["memit", "alphaedit", "ft"])
def test_overlapped_sphere_fit_edits_the_same(tok, cache, method):
    """Fits started on a background thread from the batch-start weights give the same edits, also when a
    weight changes after the batch starts (that layer is fitted again) and under FT, which trains the live
    weight in place."""
    reqs = small(tok, 4)
    for nudge in (False, True):
        runs = []
        for overlap in (False, True):
            ed = make_editor(tiny_model("llama", tok), tok, cache, method, hp=FAST, sphere=True,
                             overlap_sphere_fit=overlap, projector=ThreadRecording)
            if nudge:
                nudged(ed, ed.edited_module_names[0])
            ThreadRecording.threads, ThreadRecording.seen = [], []
            ranks = [{n: layer["rank"] for n, layer in ed.edit_batch(batch)["layers"].items()}
                     for batch in (reqs[:2], reqs[2:])]
            runs.append((ed, ranks))
            # Overlapped, every layer is fitted in the background, and the nudged one again when its update comes.
            layers = len(ed.edited_module_names)
            # One fitting thread for the Editor's life, both batches (its handles are made once).
            expected = ((["sphere-prefit_0"] * layers + ["MainThread"] * nudge) * 2 if overlap
                        else ["MainThread"] * layers * 2)
            assert sorted(ThreadRecording.threads) == sorted(expected), (overlap, nudge)
            assert len({id(t) for t in ThreadRecording.seen}) == 1 + (overlap and nudge), (overlap, nudge)
        (plain, plain_ranks), (overlapped, overlapped_ranks) = runs
        assert overlapped_ranks == plain_ranks
        assert all(r is not None for batch in plain_ranks for r in batch.values())
        for n, w in plain.edited_weights().items():
            assert torch.equal(w, overlapped.edited_weights()[n]), (nudge, n)
            assert torch.equal(plain._projectors[n].U, overlapped._projectors[n].U), (nudge, n)
        assert overlapped._prefit is None  # the fits are waited for when the batch ends


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_overlapped_sphere_fit_on_cuda(tok, cache):
    """On a GPU the fits run in a side stream: the edits match the plain run's to well within the update
    (a stale or unsynchronised projector would be off by a share of it; bits may differ between runs)."""
    reqs = small(tok, 4)
    for nudge in (False, True):
        runs = []
        for overlap in (False, True):
            model = tiny_model("llama", tok).to("cuda")
            ed = make_editor(model, tok, cache, "alphaedit", hp=FAST, sphere=True, overlap_sphere_fit=overlap)
            unedited = {n: w.clone() for n, w in ed.edited_weights().items()}
            if nudge:
                nudged(ed, ed.edited_module_names[0])
            for batch in (reqs[:2], reqs[2:]):
                ed.edit_batch(batch)
            runs.append((ed, unedited))
        (plain, unedited), (overlapped, _) = runs
        for n, w in plain.edited_weights().items():
            update = (w.double() - unedited[n].double()).norm()
            assert w.is_cuda and update > 0
            assert (overlapped.edited_weights()[n].double() - w.double()).norm() <= 1e-4 * update, (nudge, n)


def test_overlapped_sphere_fit_failure_leaves_no_trace(tok, cache):
    """A fit that fails on the background thread fails the batch in the editing thread, all-or-nothing."""
    reqs = small(tok, 4)
    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, cache, "memit", hp=FAST, sphere=True, projector=RefitFails,
                     overlap_sphere_fit=True)
    ed.edit_batch(reqs[:2])
    before = params_copy(model)
    with pytest.raises(FloatingPointError, match="injected refit failure"):
        ed.edit_batch(reqs[2:])
    assert ed.batches_done == 1 and ed._prefit is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(TypeError, match="overlap_sphere_fit"):
        make_editor(model, tok, cache, "memit", overlap_sphere_fit="yes")


@pytest.mark.parametrize(
    "bad, field",
    [
        (EditRequest(prompt="The mother tongue of", subject="Danielle Darrieux", target_new="English"), "exactly one"),
        (EditRequest(prompt="The mother tongue of {}", subject="Danielle Darrieux", target_new="  "), "target_new"),
        (EditRequest(prompt="The mother tongue of {}", subject=" ", target_new="English"), "subject"),
        (EditRequest(prompt="The city of {}s is", subject="Pari", target_new="France"), "tokenise inside"),
    ],
)
def test_bad_requests_are_named_before_any_change(tok, cache, bad, field):
    model = tiny_model("llama", tok)
    before = params_copy(model)
    ed = make_editor(model, tok, cache, "memit", hp=FAST, sphere=True)
    reqs = small(tok, 2) + [bad]
    with pytest.raises(ValueError, match=rf"requests\[2\].*{field}"):
        ed.edit_batch(reqs)
    with pytest.raises(ValueError, match="empty"):
        ed.edit_batch([])
    assert ed.batches_done == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_editor_argument_errors(tok, cache):
    model = tiny_model("llama", tok)
    hp = hparams(model, "memit")
    with pytest.raises(ValueError, match="method"):
        Editor(model, tok, hp, method="rome")
    with pytest.raises(ValueError, match="eta"):
        Editor(model, tok, hp, method="memit", eta=0.0, cache_dir=cache)
    with pytest.raises(ValueError, match="alpha"):
        Editor(model, tok, hp, method="memit", alpha=1.5, cache_dir=cache)
    with pytest.raises(ValueError, match="v_loss_layer"):
        Editor(model, tok, hp.replace(layers=[1, 2], v_loss_layer=7), method="memit", cache_dir=cache)
    with pytest.raises(ValueError, match="no module"):
        Editor(model, tok, hp.replace(rewrite_module_tmp="model.layers.{}.mlp.out_proj"), method="memit")
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        Editor(model, tok, hp.replace(rewrite_module_tmp="model.layers.{}.mlp.act_fn"), method="memit")
    with pytest.raises(FileNotFoundError, match="stats_corpus"):
        Editor(model, tok, hp, method="memit", stats_corpus="/nonexistent/corpus.txt")
    ed = Editor(model, tok, hp, method="alphaedit", cache_dir=cache, progress=False)
    assert (ed.eta, ed.alpha) == (0.5, 0.5)
    assert Editor(model, tok, hp, method="memit", cache_dir=cache).alpha == 0.8
    assert Editor(model, tok, hp.replace(suppression_strength=0.3), method="memit", cache_dir=cache).alpha == 0.3
    with pytest.warns(UserWarning, match="mom2_dataset 'wikipedia' is not a local"):
        Editor(model, tok, hp.replace(mom2_dataset="wikipedia"), method="memit", cache_dir=cache)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gptj"])
def test_other_architectures(cache, arch):
    """GPT-2's Conv1D (stored [in, out]), Qwen2 and GPT-J edit through the same [out, in] orientation."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, tok)
    ed = make_editor(model, tok, cache, "alphaedit", hp={"v_num_grad_steps": 10}, sphere=True)
    name = ed.edited_module_names[0]
    stored_before = get_module(model, name).weight.detach().clone()
    info = ed.edit_batch(small(tok, 4))
    assert info["z_residual_before"] >= 3 * info["z_residual_after"], info
    W = ed.edited_weights()[name]
    assert tuple(W.shape) == (128, 512)
    stored = get_module(model, name).weight
    assert info["layers"][name]["conv1d"] == (arch == "gpt2")
    assert torch.equal(W, stored.T if arch == "gpt2" else stored)
    assert not torch.equal(stored, stored_before)


def test_full_counterfact_prompts_run(tok, cache):
    """Prompts that continue after the subject, multi-token targets: runs end to end (MEMIT + SPHERE)."""
    model = tiny_model("llama", tok)
    reqs = counterfact_requests(4)
    assert any(len(tok(" " + r.target_new, add_special_tokens=False)["input_ids"]) > 1 for r in reqs)
    ed = make_editor(model, tok, cache, "memit", hp=FAST, sphere=True)
    info = ed.edit_batch(reqs)
    assert info["batch_size"] == 4
    for w in ed.edited_weights().values():
        assert bool(torch.isfinite(w).all())
    assert all(layer["rank"] >= 1 for layer in info["layers"].values())


def test_state_dict_round_trip(tok, cache, tmp_path):
    model = tiny_model("llama", tok)
    ed = make_editor(model, tok, cache, "alphaedit", hp=FAST, sphere=True)
    ed.edit_batch(small(tok, 2))
    state = ed.state_dict()
    for entry in state["layers"].values():
        assert all(isinstance(v, torch.Tensor) for v in entry["projector"].values() if not isinstance(v, (str, int, float, list)))
    other = make_editor(tiny_model("llama", tok), tok, cache, "alphaedit", hp=FAST, sphere=True)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["batches_done"] == 1 and again["templates"] == state["templates"]
    for n in ed.edited_module_names:
        assert torch.equal(again["layers"][n]["cache_c"], state["layers"][n]["cache_c"])
        assert torch.equal(again["layers"][n]["projector"]["U"], state["layers"][n]["projector"]["U"])
    wrong = make_editor(tiny_model("llama", tok), tok, cache, "memit", hp=FAST, sphere=True)
    with pytest.raises(ValueError, match="method"):
        wrong.load_state_dict(state)
    # Other settings, or C0 from another corpus: refused before anything changes.
    other_hp = make_editor(tiny_model("llama", tok), tok, cache, "alphaedit", hp={**FAST, "L2": 20.0}, sphere=True)
    with pytest.raises(ValueError, match=r"other hparams: L2=.*this Editor has 20\.0"):
        other_hp.load_state_dict(state)
    assert other_hp.batches_done == 0 and other_hp._templates is None
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Another corpus, for other key statistics.\n" * 8)
    other_corpus = make_editor(tiny_model("llama", tok), tok, cache, "alphaedit", hp=FAST, sphere=True,
                               stats_corpus=corpus)
    with pytest.raises(ValueError, match="another corpus"):
        other_corpus.load_state_dict(state)
    assert other_corpus.batches_done == 0 and other_corpus._templates is None
    legacy = {k: v for k, v in state.items() if k != "hparams"}  # saved before the hparams were kept
    make_editor(tiny_model("llama", tok), tok, cache, "alphaedit", hp=FAST, sphere=True).load_state_dict(legacy)


def test_bf16_model_keeps_its_dtype(tok, cache):
    """A bf16 model: keys and solves in fp32/fp64, the update written back in bf16 (SPHERE apply_ and plain)."""
    reqs = small(tok, 4)
    for sphere in (True, False):
        model = tiny_model("llama", tok).to(torch.bfloat16)
        ed = make_editor(model, tok, cache, "alphaedit", hp={"v_num_grad_steps": 10}, sphere=sphere)
        info = ed.edit_batch(reqs)
        assert info["z_residual_before"] >= 3 * info["z_residual_after"], info
        for w in ed.edited_weights().values():
            assert w.dtype == torch.bfloat16 and bool(torch.isfinite(w).all())
