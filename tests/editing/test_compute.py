"""Building blocks: token lookup, context templates, target values, and the closed forms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sphere_fast.editing import targets
from sphere_fast.editing.alphaedit import alphaedit_update, nullspace_projector
from sphere_fast.editing.compute import (
    KL_PROMPTS,
    compute_keys,
    context_templates,
    layer_outputs,
    lookup_index,
    subject_token_index,
    target_ids,
)
from sphere_fast.editing.hparams import default_hparams
from sphere_fast.editing.memit import memit_update
from sphere_fast.editing.model_utils import get_module
from sphere_fast.editing.targets import TargetPlan, compute_targets

from .fixtures import counterfact_requests, subject_end_requests, tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tok(request):
    return tiny_tokenizer(bos=request.param)


class SlowView:
    """The same tokenizer seen as a slow one (no offsets): exercises the prefix rule."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *a, **k):
        return self._tok(*a, **k)


@pytest.mark.parametrize("template, subject", [("The mother tongue of {}", "Danielle Darrieux"),
                                               ("{} is a", "Edwin of Northumbria"),
                                               ("Where {}'s office is", "Toyota")])
def test_subject_last_token(tok, template, subject):
    ids, idx = lookup_index(tok, template, subject, "subject_last")
    text = template.replace("{}", subject)
    assert ids == tok(text)["input_ids"]
    # The tokens up to idx decode to the text up to the subject's end.
    assert tok.decode(ids[:idx + 1], skip_special_tokens=True) == text[:text.index(subject) + len(subject)]
    start = text.index(subject)
    assert subject_token_index(SlowView(tok), text, start, start + len(subject)) == idx
    assert lookup_index(tok, template, subject, "last")[1] == len(ids) - 1


def test_subject_must_end_on_a_token_boundary(tok):
    with pytest.raises(ValueError, match="tokenise inside"):
        lookup_index(tok, "The {}s is", "Pari", "subject_last")


def test_target_ids_leading_space_no_bos(tok):
    ids = target_ids(tok, "English")
    assert ids == tok(" English", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids
    assert target_ids(tok, " English ") == ids
    with pytest.raises(ValueError, match="empty"):
        target_ids(tok, " ")


@pytest.fixture(scope="module")
def model_tok():
    tok = tiny_tokenizer(bos=True)
    return tiny_model("llama", tok), tok


def test_context_templates_seeded(model_tok):
    model, tok = model_tok
    a = context_templates(model, tok, seed=0)
    assert a == context_templates(model, tok, seed=0)
    assert a != context_templates(model, tok, seed=1)
    assert a[0] == ["{}"] and len(a[1]) == 5
    assert all(t.endswith(". {}") and t.count("{}") == 1 and "{" not in t[:-2] for t in a[1])


def test_keys_average_template_groups(model_tok):
    """The key is the mean over groups of the mean within each group (the public compute_ks)."""
    model, tok = model_tok
    hp = default_hparams(model, "memit")
    req = subject_end_requests(tok, 1)[0]
    templates = [["{}"], ["Hello there. {}", "A day. {}", "It was cold. {}"]]
    name = hp.rewrite_module_tmp.format(1)
    key = compute_keys(model, tok, [req], hp, [name], templates)[name][0]
    single = [compute_keys(model, tok, [req], hp, [name], [[t]])[name][0] for t in templates[0] + templates[1]]
    expected = 0.5 * single[0] + 0.5 * torch.stack(single[1:]).mean(0)
    torch.testing.assert_close(key, expected, rtol=1e-5, atol=1e-6)


def test_batched_targets_equal_one_at_a_time(model_tok):
    model, tok = model_tok
    hp = default_hparams(model, "alphaedit").replace(v_num_grad_steps=6)
    reqs = subject_end_requests(tok, 3)
    templates = context_templates(model, tok, seed=0)
    batched = compute_targets(model, tok, reqs, TargetPlan.from_hparams(hp), templates)
    for req, got in zip(reqs, batched):
        alone = compute_targets(model, tok, [req], TargetPlan.from_hparams(hp), templates)[0]
        torch.testing.assert_close(got.z, alone.z, rtol=1e-4, atol=1e-5)
        assert got.steps == alone.steps
        delta = got.z - got.init
        assert 0 < delta.norm() <= hp.clamp_norm_factor * got.init.norm() * (1 + 1e-5)
        assert got.nll_after < got.nll_before


def plain_target(model, tok, req, hp, templates):
    """The target optimisation written out plainly, one request at a time (the public compute_z):
    the whole model on every whole prompt at every step, delta added by a hook at each lookup token.

    Returns (z, optimiser steps taken, loss at every step).
    """
    layer = hp.layers[-1]
    tgt = target_ids(tok, req.target_new)
    prompts = [lookup_index(tok, ctx.replace("{}", req.prompt, 1), req.subject, hp.fact_token)
               for group in templates for ctx in group]
    kl_prompts = [lookup_index(tok, t, req.subject, hp.fact_token) for t in KL_PROMPTS]
    seqs = [ids + tgt[:-1] for ids, _ in prompts] + [ids for ids, _ in kl_prompts]
    lookups = [idx for _, idx in prompts + kl_prompts]
    width = max(map(len, seqs))
    input_ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    ln_f, lm_head = get_module(model, hp.ln_f_module), get_module(model, hp.lm_head_module)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    seen = {}

    def add_delta(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen.setdefault("init", h[0, lookups[0]].detach().clone())
        h = h.clone()
        for row, idx in enumerate(lookups):
            h[row, idx] = h[row, idx] + delta
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def keep_loss_layer(module, args, out):
        seen["loss_h"] = out[0] if isinstance(out, tuple) else out

    hooks = [get_module(model, hp.layer_module_tmp.format(layer)).register_forward_hook(add_delta),
             get_module(model, hp.layer_module_tmp.format(max(hp.v_loss_layer, layer))).register_forward_hook(
                 keep_loss_layer)]
    requires = [q.requires_grad for q in model.parameters()]
    for q in model.parameters():
        q.requires_grad_(False)
    steps, losses = 0, []
    try:
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            n_rw = len(prompts)
            kl_logp = torch.log_softmax(torch.stack([logits[n_rw + i, idx] for i, (_, idx) in enumerate(kl_prompts)]),
                                        -1)
            seen.setdefault("kl_init", kl_logp.detach().clone())
            logp = torch.log_softmax(lm_head(ln_f(seen["loss_h"])), -1)
            nll = torch.stack([-torch.stack([logp[row, len(ids) - 1 + t, token] for t, token in enumerate(tgt)]).mean()
                               for row, (ids, _) in enumerate(prompts)]).mean()
            kl = hp.kl_factor * F.kl_div(seen["kl_init"], kl_logp, log_target=True, reduction="batchmean")
            loss = nll + kl + hp.v_weight_decay * (delta.norm() / seen["init"].norm() ** 2)
            losses.append(float(loss.detach()))
            if losses[-1] < 5e-2 or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * seen["init"].norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        for h in hooks:
            h.remove()
        for q, r in zip(model.parameters(), requires):
            q.requires_grad_(r)
    return seen["init"] + delta.detach(), steps, losses


def spy_on_steps(monkeypatch):
    """Record, for every optimisation forward: (rows fed, positions fed per row, width of the whole rows, windowed)."""
    calls = []
    real = targets._Steps.forward

    def forward(self, delta):
        calls.append((len(self.sel), self.input_ids.shape[1], self.width, self.windowed))
        return real(self, delta)

    monkeypatch.setattr(targets._Steps, "forward", forward)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gptj"])
def test_targets_match_the_plain_optimisation(arch, monkeypatch):
    """Full CounterFact prompts (text after the subject, several target tokens): each request's z,
    step count and NLLs equal the plain one-request, whole-model optimisation, and only the
    prompt suffixes from the lookup token on were fed."""
    tok = tiny_tokenizer(bos=arch == "llama")
    model = tiny_model(arch, tok)
    hp = default_hparams(model, "alphaedit").replace(v_num_grad_steps=6)
    reqs = counterfact_requests(3)
    templates = context_templates(model, tok, seed=0)
    calls = spy_on_steps(monkeypatch)
    got = compute_targets(model, tok, reqs, TargetPlan.from_hparams(hp), templates)
    assert calls and all(windowed and fed < width for _, fed, width, windowed in calls)
    for req, result in zip(reqs, got):
        z, steps, losses = plain_target(model, tok, req, hp, templates)
        torch.testing.assert_close(result.z, z, rtol=1e-5, atol=1e-5 * float(z.abs().max()))
        assert result.steps == steps
        assert abs(result.nll_after - result.nll_before) > 1e-4  # the optimisation moved


def test_converged_requests_leave_the_batch(monkeypatch):
    """Requests that reach loss < 5e-2 stop (as alone) and are no longer fed; the others go on."""
    tok = tiny_tokenizer(bos=True)
    model = tiny_model("llama", tok)
    with torch.no_grad():  # a sharper head, so that some targets can become near-certain
        model.lm_head.weight.mul_(10.0)
    hp = default_hparams(model, "alphaedit").replace(v_num_grad_steps=25, v_lr=0.2, v_weight_decay=0.0,
                                                     kl_factor=1e-3)
    reqs = subject_end_requests(tok, 3)
    templates = context_templates(model, tok, seed=0)
    plain = [plain_target(model, tok, req, hp, templates) for req in reqs]
    # The stops must not sit on the threshold, or rounding could move them.
    assert min(abs(loss - 5e-2) for _, _, losses in plain for loss in losses) > 1e-4
    plain_steps = [steps for _, steps, _ in plain]
    assert min(plain_steps) < 5 and max(plain_steps) == hp.v_num_grad_steps - 1

    calls = spy_on_steps(monkeypatch)
    got = compute_targets(model, tok, reqs, TargetPlan.from_hparams(hp), templates)
    assert [r.steps for r in got] == plain_steps
    for result, (z, _, losses) in zip(got, plain):
        torch.testing.assert_close(result.z, z, rtol=1e-5, atol=1e-5 * float(z.abs().max()))
    rows_per_request = len(KL_PROMPTS) + sum(len(g) for g in templates)
    fed = [rows for rows, *_ in calls]
    assert fed[0] == 3 * rows_per_request and fed[-1] == rows_per_request
    assert fed == sorted(fed, reverse=True) and len(calls) == hp.v_num_grad_steps


def test_whole_rows_when_the_window_disagrees(monkeypatch):
    """If the cached-prefix forward ever disagrees with the model's own, the optimisation warns and
    feeds whole prompts, with the same result."""
    tok = tiny_tokenizer(bos=True)
    model = tiny_model("llama", tok)
    hp = default_hparams(model, "alphaedit").replace(v_num_grad_steps=4)
    reqs = counterfact_requests(2)
    templates = [["{}"], ["A day. {}"]]
    windowed = compute_targets(model, tok, reqs, TargetPlan.from_hparams(hp), templates)
    monkeypatch.setattr(targets._Steps, "agrees", lambda self, labels, kl: False)
    calls = spy_on_steps(monkeypatch)
    with pytest.warns(UserWarning, match="whole prompts"):
        whole = compute_targets(model, tok, reqs, TargetPlan.from_hparams(hp), templates)
    assert calls[0][3] and not any(w for *_, w in calls[1:])
    assert all(fed == width for _, fed, width, _ in calls[1:])
    for a, b in zip(windowed, whole):
        torch.testing.assert_close(a.z, b.z, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="group"):
        compute_targets(model, tok, reqs, TargetPlan.from_hparams(hp), templates, group=0)


def test_keys_and_layer_outputs_stop_after_the_module_they_read(model_tok):
    """Keys of layer 1 and outputs of layer 2 need nothing above them: no later layer, no LM head runs."""
    model, tok = model_tok
    hp = default_hparams(model, "alphaedit")
    reqs = counterfact_requests(2)
    templates = [["{}"], ["A day. {}"]]
    name = hp.rewrite_module_tmp.format(1)
    ran = []
    watched = [hp.layer_module_tmp.format(2), hp.layer_module_tmp.format(3), hp.lm_head_module]
    hooks = [get_module(model, w).register_forward_hook(lambda *a, w=w: ran.append(w)) for w in watched]
    try:
        keys = compute_keys(model, tok, reqs, hp, [name], templates)[name]
        assert ran == []
        outs = layer_outputs(model, tok, reqs, hp, 2)
        assert set(ran) == {hp.layer_module_tmp.format(2)}
    finally:
        for h in hooks:
            h.remove()
    # Against the whole model, one prompt at a time.
    for r, req in enumerate(reqs):
        captured = {}
        hook_in = get_module(model, name).register_forward_hook(lambda m, a, o: captured.__setitem__("k", a[0]))
        hook_out = get_module(model, hp.layer_module_tmp.format(2)).register_forward_hook(
            lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            singles = []
            with torch.no_grad():
                for ctx in ["{}", "A day. {}"]:
                    ids, idx = lookup_index(tok, ctx.replace("{}", req.prompt), req.subject, hp.fact_token)
                    model(input_ids=torch.tensor([ids]))
                    singles.append(captured["k"][0, idx])
                    if ctx == "{}":
                        h = captured["h"][0, idx]
        finally:
            hook_in.remove()
            hook_out.remove()
        torch.testing.assert_close(keys[r], 0.5 * singles[0] + 0.5 * singles[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[r], h, rtol=1e-5, atol=1e-6)


def test_clamp_holds_with_a_large_step(model_tok):
    model, tok = model_tok
    hp = default_hparams(model, "alphaedit").replace(v_num_grad_steps=5, v_lr=50.0, clamp_norm_factor=0.1)
    for r in compute_targets(model, tok, subject_end_requests(tok, 2), TargetPlan.from_hparams(hp), [["{}"]]):
        assert (r.z - r.init).norm() <= 0.1 * r.init.norm() * (1 + 1e-5)
        assert (r.z - r.init).norm() >= 0.1 * r.init.norm() * (1 - 1e-3)  # the clamp was reached


def _random_problem(d=24, out=16, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    C0 = X.T @ X / 200
    K = torch.randn(d, n, generator=g, dtype=torch.float64)
    R = torch.randn(out, n, generator=g, dtype=torch.float64)
    return C0, K, R


def test_memit_normal_equations():
    C0, K, R = _random_problem()
    lam = 3.0
    delta = memit_update(K, R, C0, lam)
    assert delta.shape == (16, 24)
    # Delta minimises ||Delta K - R||^2 + lam tr(Delta C0 Delta^T): Delta (lam C0 + K K^T) = R K^T.
    torch.testing.assert_close(delta @ (lam * C0 + K @ K.T), R @ K.T, rtol=1e-10, atol=1e-10)


def test_alphaedit_update_lies_in_the_null_space():
    C0, K, R = _random_problem()
    values = torch.linalg.eigvalsh(C0)
    # Half of the spectrum, relative to it. The threshold sits between two eigenvalues: one
    # placed exactly on an eigenvalue counts it or not by the last bit of LAPACK's rounding.
    threshold = float((values[11] * values[12]).sqrt())
    P, k = nullspace_projector(C0, threshold)
    assert k == 12
    torch.testing.assert_close(P.double() @ P.double(), P.double(), atol=1e-6, rtol=0)
    cache_c = K[:, :2] @ K[:, :2].T
    delta = alphaedit_update(K, R, P, cache_c, 0.1)
    Pd = P.double()
    # The public closed form, and Delta^T in range(P): Delta (I - P) = 0, so Delta k0 = 0 on C0's top space.
    lhs = Pd @ (K @ K.T + cache_c) + 0.1 * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(lhs @ delta.T, Pd @ K @ R.T, rtol=1e-8, atol=1e-8)
    vecs = torch.linalg.eigh(C0).eigenvectors[:, 12:]
    assert (delta @ vecs).norm() <= 1e-6 * delta.norm()
    with pytest.raises(ValueError, match="cache_c"):
        alphaedit_update(K, R, P, cache_c[:3], 0.1)
    with pytest.raises(ValueError, match="C0"):
        memit_update(K, R, C0[:3, :3], 1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gptj"])
def test_stand_ins_for_lower_layers_match_the_full_forward(arch):
    """compute_targets replaces the layers up to the edited one by stand-ins that return its recorded output."""
    from sphere_fast.editing.model_utils import get_module, hidden_of, stand_in_lower_layers, trace

    tok = tiny_tokenizer(bos=True)
    model = tiny_model(arch, tok)
    tmp = default_hparams(model, "alphaedit").layer_module_tmp
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    body = model.base_model

    def forward():
        return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    last = 1
    name = tmp.format(last)

    def bump(module_name, h):
        return h + 0.25 if module_name == name else None

    with torch.no_grad():
        recorded = []
        hook = get_module(model, name).register_forward_hook(lambda m, a, out: recorded.append(out))
        with trace(model, [name], edit=bump):
            expected = forward()
        hook.remove()
        originals = [get_module(model, tmp.format(i)) for i in range(model.config.num_hidden_layers)]
        calls = []
        hook = originals[0].register_forward_hook(lambda *a: calls.append(1))
        with stand_in_lower_layers(model, tmp, last, recorded[0], hidden_of(recorded[0])) as stand_in:
            assert stand_in is not None
            with trace(model, [name], edit=bump):
                got = forward()
            assert calls == []  # layer 0 did not run
            stand_in.hidden = torch.zeros_like(stand_in.hidden)  # what the stand-in returns can change
            with trace(model, [name], edit=bump):
                other = forward()
        hook.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(other, expected)
    assert [get_module(model, tmp.format(i)) for i in range(len(originals))] == originals
    with pytest.raises(RuntimeError, match="inside"):
        with stand_in_lower_layers(model, tmp, last, recorded[0], hidden_of(recorded[0])):
            raise RuntimeError("inside")
    assert [get_module(model, tmp.format(i)) for i in range(len(originals))] == originals


def test_no_stand_ins_for_layers_outside_a_module_list():
    from sphere_fast.editing.model_utils import stand_in_lower_layers

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with stand_in_lower_layers(model, "{}", 0, None, None) as stand_in:
        assert stand_in is None
    assert isinstance(model[0], torch.nn.Linear)
