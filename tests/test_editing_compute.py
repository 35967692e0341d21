"""Building blocks: token lookup, context templates, target values, and the closed forms."""
from __future__ import annotations

import pytest
import torch

from sphere_fast.editing.alphaedit import alphaedit_update, nullspace_projector
from sphere_fast.editing.compute import (
    compute_keys,
    compute_target,
    compute_targets,
    context_templates,
    lookup_index,
    subject_token_index,
    target_ids,
)
from sphere_fast.editing.hparams import default_hparams
from sphere_fast.editing.memit import memit_update

from .editing_fixtures import one_thread, subject_end_requests, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


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
    batched = compute_targets(model, tok, reqs, hp, templates)
    for req, got in zip(reqs, batched):
        alone = compute_target(model, tok, req, hp, templates)
        torch.testing.assert_close(got.z, alone.z, rtol=1e-4, atol=1e-5)
        assert got.steps == alone.steps
        delta = got.z - got.init
        assert 0 < delta.norm() <= hp.clamp_norm_factor * got.init.norm() * (1 + 1e-5)
        assert got.nll_after < got.nll_before


def test_clamp_holds_with_a_large_step(model_tok):
    model, tok = model_tok
    hp = default_hparams(model, "alphaedit").replace(v_num_grad_steps=5, v_lr=50.0, clamp_norm_factor=0.1)
    for r in compute_targets(model, tok, subject_end_requests(tok, 2), hp, [["{}"]]):
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
    threshold = float(values[12])  # half of the spectrum, relative to it
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
def test_replayed_lower_layers_match_the_full_forward(arch):
    """compute_targets skips the layers below the edited one; the skipped forward equals the real one."""
    from sphere_fast.editing.model_utils import get_module, replay_lower_layers, trace

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
        with trace(model, [name], edit=bump):
            expected = forward()
        originals = [get_module(model, tmp.format(i)) for i in range(model.config.num_hidden_layers)]
        calls = []
        hook = originals[0].register_forward_hook(lambda *a: calls.append(1))
        with replay_lower_layers(model, tmp, last, forward) as replayed:
            assert replayed and len(calls) == 1  # the recording run only
            with trace(model, [name], edit=bump):
                got = forward()
            assert len(calls) == 1  # layer 0 was not run again
        hook.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [get_module(model, tmp.format(i)) for i in range(len(originals))] == originals
    with pytest.raises(RuntimeError, match="inside"):
        with replay_lower_layers(model, tmp, last, forward):
            raise RuntimeError("inside")
    assert [get_module(model, tmp.format(i)) for i in range(len(originals))] == originals


def test_replay_skips_nothing_for_layers_outside_a_module_list():
    from sphere_fast.editing.model_utils import replay_lower_layers

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    ran = []
    with replay_lower_layers(model, "{}", 0, lambda: ran.append(1)) as replayed:
        assert replayed is False and ran == []
