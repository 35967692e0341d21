"""The torch twins of the Gram and energy ops, the public ops and the backend dispatch."""
from __future__ import annotations

import itertools
import threading

import pytest
import torch

import sphere_fast
from sphere_fast import BackendUnavailableError, hyperspherical_energy, normalized_gram
from sphere_fast.accuracy import gram_tolerance, norm_tolerance
from sphere_fast.backends import resolve_backend
from sphere_fast.gram import hyperspherical_energy_reference, normalized_gram_reference


def brute_force_energy(W: torch.Tensor, s: float, eps: float) -> float:
    A = W.double()
    A_hat = A / (A.norm(dim=1, keepdim=True) + 1e-8)
    total = 0.0
    for i, j in itertools.permutations(range(A.shape[0]), 2):
        cos = float(A_hat[i] @ A_hat[j])
        total += (max(2.0 - 2.0 * cos, 0.0) + eps) ** (-s / 2.0)
    return total


@pytest.mark.parametrize("shape, side", [((7, 20), "rows"), ((20, 7), "cols"), ((9, 9), "rows"), ((1, 5), "rows")])
def test_normalized_gram_side_trace_and_symmetry(shape, side, device):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    W[0] *= 100.0  # normalisation must remove the scale
    g = normalized_gram(W)
    assert g.side == side and g.gram.dtype == torch.float32
    assert torch.equal(g.gram, g.gram.T)
    A_hat = W.double() / (W.double().norm(dim=1, keepdim=True) + 1e-8)
    expected = A_hat @ A_hat.T if side == "rows" else A_hat.T @ A_hat
    K = shape[1] if side == "rows" else shape[0]
    tol = gram_tolerance(expected / shape[0], K, W.dtype, "fp32", side)
    assert bool(((g.gram.double() - expected / shape[0]).abs() <= tol).all())
    assert abs(g.trace - float(torch.trace(expected)) / shape[0]) <= 1e-12
    norms = W.double().norm(dim=1)
    assert bool(((g.row_norms.double() - norms).abs() <= norm_tolerance(norms, shape[1], W.dtype)).all())


def test_normalized_gram_low_precision_inputs_accumulate_in_fp32():
    W = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.bfloat16, torch.float16):
        g = normalized_gram(W.to(dtype))
        exact = normalized_gram_reference(W.to(dtype), dtype=torch.float64)
        assert g.gram.dtype == torch.float32
        tol = gram_tolerance(exact.gram, 40, dtype, "fp32", "rows")
        assert bool(((g.gram.double() - exact.gram).abs() <= tol).all())


@pytest.mark.parametrize("s, eps", [(2.0, 1e-6), (1.0, 1e-3), (0.5, 1e-6)])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_energy_matches_brute_force(s, eps, dtype, rtol, device):
    W = torch.randn(11, 6, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    W[5] = 0.0
    if dtype == torch.float64:
        # A duplicate pair (distance 0, eps keeps it finite). 2 - 2 cos cancels
        # catastrophically in fp32 for near-duplicates, so only fp64 checks it.
        W[3] = W[2]
    got = hyperspherical_energy(W, s=s, eps=eps)
    assert got.dtype == torch.float64 and got.dim() == 0
    expected = brute_force_energy(W.cpu(), s, eps)
    assert abs(float(got) - expected) <= rtol * expected


def test_energy_blocking_does_not_change_the_sum():
    W = torch.randn(50, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = hyperspherical_energy_reference(W, block_rows=1000)
    blocked = hyperspherical_energy_reference(W, block_rows=7)
    assert abs(float(whole - blocked)) <= 1e-12 * float(whole)


def test_energy_bad_arguments():
    with pytest.raises(ValueError, match="s must be > 0"):
        hyperspherical_energy(torch.randn(3, 4), s=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        hyperspherical_energy(torch.randn(3, 4), eps=-1.0)
    with pytest.raises(ValueError, match="W must be 2-D"):
        hyperspherical_energy(torch.randn(3))


def test_gram_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        normalized_gram(torch.randn(3, 4), precision="fp8")


# -- dispatch ------------------------------------------------------------------------


def test_auto_on_cpu_is_torch():
    cpu = torch.device("cpu")
    for op in ("gram", "energy", "eigensolver", "apply"):
        assert resolve_backend(op, "auto", cpu) == "torch"


def test_explicit_cuda_on_cpu_raises_with_reason():
    with pytest.raises(BackendUnavailableError, match="needs a CUDA tensor"):
        sphere_fast.SphereProjector.fit(torch.randn(4, 6), backend="cuda")


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        resolve_backend("gram", None, torch.device("cpu"))
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SPHERE_FAST_BACKEND must be one of"):
        resolve_backend("gram", None, torch.device("cpu"))
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "torch")
    assert resolve_backend("apply", None, torch.device("cpu")) == "torch"


def test_explicit_choice_falls_through_for_ops_it_lacks(monkeypatch):
    # "triton" implements gram/energy; the eigensolver and apply go on to torch.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    cpu = torch.device("cpu")
    assert resolve_backend("gram", "triton", cpu) == "triton"
    assert resolve_backend("eigensolver", "triton", cpu) == "torch"


def test_dispatch_table_matches_the_advertised_ops_and_every_entry_resolves():
    """The table is the one place a backend is chosen: each entry imports to a function that takes its op's call."""
    import importlib.util
    import inspect
    import re

    from sphere_fast import backends

    # the ops and backends the module docstring advertises, e.g. "    gram, energy    triton, torch"
    advertised = {}
    for ops, names in re.findall(r"^    ([a-z_]+(?:, [a-z_]+)*) {2,}([a-z]+(?:, [a-z]+)*)$", backends.__doc__, re.M):
        advertised.update({op: tuple(names.split(", ")) for op in ops.split(", ")})
    assert advertised == backends.OPS == {
        "gram": ("triton", "torch"), "energy": ("triton", "torch"), "eigensolver": ("cuda", "torch"),
        "apply": ("cuda", "torch"), "apply_": ("cuda", "torch"),
    }
    # one call per op, with the arguments the dispatching code passes
    calls = {
        "gram": (("W",), {"precision": "fp32"}),
        "energy": (("W",), {"s": 2.0, "eps": 1e-6}),
        "eigensolver": (("G", 1.0, 0.5), {"method": "auto", "init": None}),
        "apply": (("B", "U", 0.5), {}),
        "apply_": (("W", "B", "U", 0.5), {}),
    }
    assert set(calls) == set(backends.IMPLEMENTATIONS)
    for op, implementations in backends.IMPLEMENTATIONS.items():
        assert "torch" in implementations, f"{op}: the torch backend must be complete on its own"
        for name in implementations:
            assert name in backends.BACKENDS
            if name == "triton" and importlib.util.find_spec("triton") is None:
                continue
            fn = backends.load_implementation(op, name)
            assert callable(fn), (op, name)
            args, kwargs = calls[op]
            inspect.signature(fn).bind(*args, **kwargs)  # TypeError if the call does not fit


def test_available_backends_reports_reasons():
    report = sphere_fast.available_backends("cpu")
    assert report["torch"] == "available"
    assert "CUDA tensor" in report["cuda"]


def test_import_does_not_load_triton_or_the_extension():
    import subprocess
    import sys

    code = "import sys, sphere_fast; print('triton' in sys.modules, 'sphere_fast._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("mode", ["ieee", "tf32"])
def test_fp32_matmul_sets_the_mode_inside_and_restores_the_callers(mode):
    from sphere_fast.gram import fp32_matmul

    cuda = torch.backends.cuda.matmul
    if not hasattr(cuda, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy switch")
    saved = cuda.fp32_precision
    other = "tf32" if mode == "ieee" else "ieee"
    try:
        cuda.fp32_precision = other
        with fp32_matmul(mode):
            assert cuda.fp32_precision == mode
        assert cuda.fp32_precision == other
        with pytest.raises(ValueError, match="mode must be one of"):
            with fp32_matmul("fp16"):
                pass
        assert cuda.fp32_precision == other
    finally:
        cuda.fp32_precision = saved


# -- fp32_matmul windows on several threads (the editor prefits on a background thread) ---------

def _matmul_settings(legacy: bool):
    if legacy:
        return torch.get_float32_matmul_precision()
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision


@pytest.fixture
def restore_matmul_settings():
    """Puts torch's fp32 matmul switches back as they were, whatever the test did."""
    legacy = torch.get_float32_matmul_precision()
    per_backend = _matmul_settings(legacy=False)
    yield
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = per_backend


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="needs torch >= 2.9")
@pytest.mark.parametrize("legacy", [False, True], ids=["per-backend", "legacy-switch"])
def test_fp32_matmul_windows_overlapping_on_two_threads(monkeypatch, restore_matmul_settings, legacy):
    """A opens, B opens, A closes, B closes: B's window stays IEEE after A has left, and the caller's
    own TF32 choice is back once both have closed (a save/restore per window would lose both)."""
    import sphere_fast.gram as gram

    if legacy:  # torch < 2.9: only torch.set_float32_matmul_precision
        monkeypatch.setattr(gram, "_per_backend_switches", lambda: {})
        torch.set_float32_matmul_precision("high")
        callers, ieee = "high", "highest"
    else:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        callers, ieee = ("tf32", "bf16"), ("ieee", "ieee")
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen, errors = {}, []

    def thread_a():
        with gram.fp32_matmul("ieee"):
            seen["A alone"] = _matmul_settings(legacy)
            a_inside.set()
            assert b_inside.wait(10)
            seen["A beside B"] = _matmul_settings(legacy)
        a_left.set()

    def thread_b():
        assert a_inside.wait(10)
        with gram.fp32_matmul("ieee"):
            b_inside.set()
            assert a_left.wait(10)
            seen["B after A left"] = _matmul_settings(legacy)

    def guarded(body):
        def run():
            try:
                body()
            except BaseException as exc:  # surfaced below, in the test's thread
                errors.append(exc)
                for event in (a_inside, b_inside, a_left):  # let the other thread finish
                    event.set()
        return threading.Thread(target=run)

    threads = [guarded(thread_a), guarded(thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert seen == {"A alone": ieee, "A beside B": ieee, "B after A left": ieee}
    assert _matmul_settings(legacy) == callers


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="needs torch >= 2.9")
def test_fp32_matmul_nested_windows_ieee_outranks_tf32(restore_matmul_settings):
    from sphere_fast.gram import fp32_matmul

    cuda = torch.backends.cuda.matmul
    cuda.fp32_precision = "none"
    with fp32_matmul("tf32"):
        assert cuda.fp32_precision == "tf32"
        with fp32_matmul("ieee"):
            assert cuda.fp32_precision == "ieee"
        assert cuda.fp32_precision == "tf32"
    assert cuda.fp32_precision == "none"
    with fp32_matmul("ieee"):
        with fp32_matmul("tf32"):  # a TF32 baseline never downgrades an open IEEE window
            assert cuda.fp32_precision == "ieee"
        assert cuda.fp32_precision == "ieee"
    assert cuda.fp32_precision == "none"
