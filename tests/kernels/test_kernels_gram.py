"""Triton kernel ``kernels/normalized_gram.py`` against its torch twin and a float64 oracle.

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports triton);
with a GPU the same tests run on CUDA tensors.

Tolerances are error bounds, not fitted constants: the entrywise bound of
:func:`sphere_fast.accuracy.gram_tolerance` (derived there) for the Gram, and
:func:`sphere_fast.accuracy.norm_tolerance` for the row norms.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from sphere_fast.accuracy import UNIT, gram_tolerance, norm_tolerance  # noqa: E402
from sphere_fast.gram import NORM_EPS, PRECISIONS, normalized_gram_reference, trace_from_norms  # noqa: E402
from sphere_fast.kernels import normalized_gram as ng  # noqa: E402
from sphere_fast.kernels import tiles  # noqa: E402
from tests.helpers import CUDA_DEVICES, DEVICES, LAYOUTS, make_matrix  # noqa: E402


def check_against_oracle(W: torch.Tensor, out, precision: str = "fp32") -> None:
    n, d = W.shape
    ref = normalized_gram_reference(W.cpu(), dtype=torch.float64)
    side = "rows" if n <= d else "cols"
    m = n if side == "rows" else d
    K = d if side == "rows" else n
    assert out.side == side and out.n == n and out.d == d
    want_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    assert out.gram.dtype == want_dtype and out.row_norms.dtype == want_dtype
    assert out.gram.shape == (m, m) and out.row_norms.shape == (n,)
    assert out.gram.device == W.device and out.row_norms.device == W.device
    G = out.gram.cpu().double()
    assert torch.equal(out.gram, out.gram.T), "Gram must be exactly symmetric"
    err = (G - ref.gram).abs()
    tol = gram_tolerance(ref.gram, K, W.dtype, precision, side)
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), (
        f"Gram off by {err.flatten()[worst]:.3e} > bound {tol.flatten()[worst]:.3e} at {divmod(worst, m)}"
    )
    r = out.row_norms.cpu().double()
    assert bool(((r - ref.row_norms).abs() <= norm_tolerance(ref.row_norms, d, W.dtype)).all())
    # the trace comes from the kernel's norms; it is insensitive to their rounding
    assert out.trace == trace_from_norms(out.row_norms)
    nonzero = ref.row_norms[ref.row_norms > 0]
    r_min = float(nonzero.min()) if nonzero.numel() else 1.0
    assert abs(out.trace - ref.trace) <= 2 * NORM_EPS * (d + 2) * UNIT[W.dtype] / r_min + 8 * 2.0**-53


def check_against_twin(W: torch.Tensor, out, precision: str = "fp32") -> None:
    """Kernel vs the fp32 torch twin: both lie within their bound of the fp64 oracle."""
    n, d = W.shape
    side = "rows" if n <= d else "cols"
    K = d if side == "rows" else n
    twin = normalized_gram_reference(W)
    ref = normalized_gram_reference(W.cpu(), dtype=torch.float64)
    tol = gram_tolerance(ref.gram, K, W.dtype, precision, side) + gram_tolerance(ref.gram, K, W.dtype, "fp32", side)
    assert bool(((out.gram.cpu().double() - twin.gram.cpu().double()).abs() <= tol).all())
    tol_r = 2 * norm_tolerance(ref.row_norms, d, W.dtype)
    assert bool(((out.row_norms.cpu().double() - twin.row_norms.cpu().double()).abs() <= tol_r).all())


SHAPES = [(37, 123), (123, 37), (1, 50), (50, 1), (64, 64), (16, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gram_matches_oracle_and_twin(device, dtype, shape):
    W = make_matrix(*shape, dtype, device)
    out = ng.normalized_gram(W)
    check_against_oracle(W, out)
    check_against_twin(W, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("shape", [(37, 123), (123, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gram_strided_inputs_are_read_in_place(device, dtype, layout, shape):
    W = make_matrix(*shape, dtype, device, layout)
    assert not W.is_contiguous()
    before = W.clone()
    out = ng.normalized_gram(W)
    check_against_oracle(W, out)
    assert torch.equal(W, before), "W must not be modified"
    if device == "cpu":  # the interpreter sums in the same order whatever the strides
        out_c = ng.normalized_gram(W.contiguous())
        assert torch.equal(out.gram, out_c.gram) and torch.equal(out.row_norms, out_c.row_norms)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 123), (123, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_zero_rows(device, dtype, shape):
    zero = (0, 5, shape[0] - 1)
    W = make_matrix(*shape, dtype, device, zero_rows=zero)
    out = ng.normalized_gram(W)
    check_against_oracle(W, out)
    assert bool((out.row_norms[list(zero)] == 0).all())
    if out.side == "rows":  # a zero row gives an exactly zero row and column
        assert bool((out.gram[list(zero)] == 0).all()) and bool((out.gram[:, list(zero)] == 0).all())
    n = shape[0]
    assert out.trace == pytest.approx((n - len(zero)) / n, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 123), (123, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_identical_rows_are_normalised_identically(device, dtype, shape):
    """A row's norm and scale do not depend on where the row sits (copies in three row blocks).

    The Gram's entries of those rows may still differ by position: the dot may
    round each output entry in its own order (the bound allows for it).
    """
    W = make_matrix(*shape, dtype, device, seed=7)
    copies = [9, 20, shape[0] - 1]
    W[copies] = W[2].clone()
    norms, scale = ng.row_norms(W)
    assert bool((norms[copies] == norms[2]).all()) and bool((scale[copies] == scale[2]).all())
    check_against_oracle(W, ng.normalized_gram(W))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37, 123), (123, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_rows_use_the_norm_eps(device, dtype, shape):
    """Rows of norm ~1e-8 are scaled by 1 / (||w|| + 1e-8), not 1 / ||w||: an O(1) effect."""
    W = make_matrix(*shape, dtype, device, seed=6)
    tiny = (1, 4)
    W[list(tiny)] *= 1e-8 / torch.linalg.vector_norm(W[list(tiny)].double(), dim=1, keepdim=True).to(device, dtype)
    out = ng.normalized_gram(W)
    check_against_oracle(W, out)
    n = shape[0]
    if out.side == "rows":
        for i in tiny:  # (r / (r + 1e-8))^2 / n with r = 1e-8
            assert float(out.gram[i, i]) * n == pytest.approx(0.25, rel=1e-5)
    assert out.trace == pytest.approx((n - 2 + 2 * 0.25) / n, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 123), (123, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_precisions(device, precision, dtype, shape):
    W = make_matrix(*shape, dtype, device, seed=3)
    out = ng.normalized_gram(W, precision=precision)
    check_against_oracle(W, out, precision)
    check_against_twin(W, out, precision)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(37, 123), (123, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_precision_is_honoured(device, shape):
    """precision="bf16" on fp32 operands really rounds them (the interpreter emulates the rounding)."""
    W = make_matrix(*shape, torch.float32, device, seed=4)
    ref = normalized_gram_reference(W.cpu(), dtype=torch.float64).gram
    err = {p: float((ng.normalized_gram(W, precision=p).gram.cpu().double() - ref).abs().max()) for p in ("fp32", "bf16")}
    assert err["bf16"] > 10 * err["fp32"]


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("shape", [(37, 123), (123, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tf32x3_precision_is_more_accurate_than_tf32(device, shape):
    """precision="tf32x3" really splits the operands (the interpreter runs both as IEEE fp32, hence CUDA only).

    TF32 keeps 10 of fp32's 23 mantissa bits (operand rounding 2^-11, 2^-10 truncated); 3xTF32 drops only
    the low x low product (about 2^-20) and otherwise rounds like fp32 (2^-24): some 2^10 apart, so 10 is loose.
    """
    W = make_matrix(*shape, torch.float32, device, seed=4)
    ref = normalized_gram_reference(W.cpu(), dtype=torch.float64).gram
    err = {p: float((ng.normalized_gram(W, precision=p).gram.cpu().double() - ref).abs().max())
           for p in ("tf32", "tf32x3")}
    assert err["tf32x3"] * 10 < err["tf32"]


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(257, 1031), (1031, 257), (300, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gram_cuda_multi_tile(device, precision, dtype, shape):
    """Shapes spanning several of the GPU's larger tiles, every autotune family."""
    W = make_matrix(*shape, dtype, device, seed=5)
    out = ng.normalized_gram(W, precision=precision)
    check_against_oracle(W, out, precision)
    check_against_twin(W, out, precision)


@pytest.mark.parametrize("device", DEVICES)
def test_gram_random_shapes(device):
    """Property: any shape, dtype and layout is within the bound of the fp64 oracle."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(n=st.integers(1, 48), d=st.integers(1, 48), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
           seed=st.integers(0, 2**16))
    def check(n, d, dtype, layout, seed):
        W = make_matrix(n, d, dtype, device, layout, seed=seed)
        check_against_oracle(W, ng.normalized_gram(W))

    check()


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_through_ops(device):
    from sphere_fast import ops

    W = make_matrix(37, 123, torch.float32, device, "col_strided")
    out = ops.normalized_gram(W, backend="triton")
    direct = ng.normalized_gram(W)
    assert torch.equal(out.gram, direct.gram) and torch.equal(out.row_norms, direct.row_norms)
    assert out.trace == direct.trace and out.side == direct.side


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    W = make_matrix(8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="precision"):
        ng.normalized_gram(W, precision="fp8")
    with pytest.raises(ValueError, match="W must be 2-D"):
        ng.normalized_gram(W[0])
    with pytest.raises(TypeError, match="W must be float16"):
        ng.normalized_gram(W.to(torch.int32))
    with pytest.raises(ValueError, match="W must not be empty"):
        ng.normalized_gram(W[:0])


@triton.jit
def _upper_tile_probe(i_ptr, j_ptr, total, num_tiles, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    i, j = tiles.upper_tile(p, num_tiles)
    tl.store(i_ptr + p, i, mask=p < total)
    tl.store(j_ptr + p, j, mask=p < total)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tiles", [1, 2, 7, 700])
def test_upper_tile_mapping_covers_the_triangle_once(device, num_tiles):
    """Program ids 0 .. T(T+1)/2 - 1 map one-to-one onto the tiles (I, J) with I <= J < T."""
    total = num_tiles * (num_tiles + 1) // 2
    i = torch.full((total,), -1, dtype=torch.int64, device=device)
    j = torch.full_like(i, -1)
    block = 4096
    _upper_tile_probe[(triton.cdiv(total, block),)](i, j, total, num_tiles, BLOCK=block)
    i, j = i.cpu(), j.cpu()
    assert bool((i >= 0).all()) and bool((i <= j).all()) and bool((j < num_tiles).all())
    codes = torch.sort(i * num_tiles + j).values
    want = torch.sort(torch.tensor([a * num_tiles + b for b in range(num_tiles) for a in range(b + 1)])).values
    assert torch.equal(codes, want)


def test_import_has_no_side_effects():
    """``import sphere_fast.kernels`` imports neither triton nor a kernel module."""
    import subprocess
    import sys

    code = (
        "import sys, sphere_fast.kernels; "
        "bad = [m for m in ('triton', 'sphere_fast.kernels.normalized_gram') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# Ahead-of-time compilation for GPU targets: needs no GPU (Triton's bundled
# ptxas), so the device code is type-checked and lowered on every machine.
_AOT_SCRIPT = r'''
import json, sys
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sphere_fast.kernels import normalized_gram as ng, hyperspherical_energy as he, tiles

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
out = []
for kernel_name, dtype_name, side, precision, cap, ones, *index in json.loads(sys.argv[1]):
    dtype = {v: k for k, v in NAMES.items()}[dtype_name]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    dot = tiles.dot_mode(dtype, precision, scaled_operands=side == "cols")
    cfg = tiles.cuda_configs((cap // 10, cap % 10), dot, torch.empty(0, dtype=dtype).element_size())[index[0] if index else 0]
    consts = {"DOT": dot, "INTERPRET": False, "ACC_DTYPE": tiles.tl_dtype(dtype), "SCALE_K": side == "cols",
              **cfg.kwargs}
    if kernel_name == "gram":
        fn = ng._normalized_gram_kernel
        sig = {"x_ptr": "*" + dtype_name, "scale_ptr": "*" + acc, "g_ptr": "*" + acc, "m": "i32", "K": "i32",
               "n": "i32", "stride_xm": "i32", "stride_xk": "i32", "stride_gm": "i32"}
    elif kernel_name == "energy":
        fn = he._hyperspherical_energy_kernel
        sig = {"w_ptr": "*" + dtype_name, "scale_ptr": "*" + acc, "params_ptr": "*" + acc, "partial_ptr": "*" + acc,
               "num_partials": "i32", "m": "i32", "K": "i32", "stride_wn": "i32", "stride_wd": "i32"}
    else:
        fn = ng._row_norms_kernel
        sig = {"w_ptr": "*" + dtype_name, "norms_ptr": "*" + acc, "scale_ptr": "*" + acc, "n": "i32", "d": "i32",
               "stride_wn": "i32", "stride_wd": "i32"}
        consts = {"EPS": 1e-8, "ACC_DTYPE": tiles.tl_dtype(dtype), **ng.NORMS_CONFIG_CUDA}
    # Triton specialises integer arguments equal to 1 into constexprs: compile those variants too
    consts.update({name: 1 for name in ones})
    signature = {**sig, **{k: "constexpr" for k in consts}}
    warps, stages = (4, 1) if kernel_name == "norms" else (cfg.num_warps, cfg.num_stages)
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                       target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
    out.append({"ptx": k.asm["ptx"], "shared": k.metadata.shared})
print(json.dumps(out))
'''

# (kernel, W dtype, side, precision, sm, arguments equal to 1) -> PTX that must / must not appear
_AOT_CASES = [
    (("norms", "bf16", "rows", "fp32", 90, []), ["sqrt.rn.f32", "div.rn.f32"], ["sqrt.approx", "div.full"]),
    # 16-bit tiles go to the tensor cores as loaded (exact products, fp32 accumulation)
    (("gram", "bf16", "rows", "fp32", 90, []), ["wgmma.mma_async", "f32.bf16.bf16", "div.rn.f32"], ["div.full"]),
    (("gram", "fp32", "rows", "fp32", 90, []), ["fma.rn.f32"], ["wgmma", "mma.sync"]),  # IEEE fp32: no tensor cores
    (("gram", "fp32", "cols", "tf32", 90, []), ["wgmma.mma_async", "f32.tf32.tf32"], ["cvt.rna.tf32"]),
    # 3xTF32: the high parts and residuals rounded to TF32 (cvt.rna), three dots per k-step (_TF32X3_PAIRS)
    (("gram", "fp32", "rows", "tf32x3", 90, []), ["wgmma.mma_async", "f32.tf32.tf32", "cvt.rna.tf32.f32"], []),
    (("gram", "bf16", "cols", "bf16", 80, []), ["mma.sync.aligned", "f32.bf16.bf16.f32"], ["wgmma"]),
    (("gram", "fp64", "cols", "fp32", 80, []), ["mma.sync.aligned", "f64.f64.f64.f64"], ["tf32", "bf16"]),
    (("energy", "bf16", "rows", "fp32", 90, []), ["wgmma.mma_async", "f32.bf16.bf16"], []),
    (("gram", "bf16", "rows", "fp32", 90, ["n", "m", "stride_xk"]), ["wgmma.mma_async"], []),
    (("energy", "fp32", "rows", "fp32", 80, ["m", "stride_wd"]), ["fma.rn.f32"], ["mma.sync"]),
    (("norms", "fp64", "rows", "fp32", 90, ["n", "d", "stride_wn", "stride_wd"]), ["sqrt.rn.f64"], []),
]

# (tf32 case, tf32x3 case, the mma instruction): the same kernel and config, so 3xTF32 issues three times the
# mma instructions of TF32 (high x high, high x low, low x high)
_TF32X3_PAIRS = [
    (("gram", "fp32", "rows", "tf32", 90, []), ("gram", "fp32", "rows", "tf32x3", 90, []), "wgmma.mma_async"),
    (("gram", "fp32", "cols", "tf32", 80, []), ("gram", "fp32", "cols", "tf32x3", 80, []), "mma.sync.aligned"),
]


def _ptxas_available() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    base = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas") if spec else ""
    return os.path.exists(base)


def _compile_ahead_of_time(cases) -> list[dict]:
    """Compile (kernel, dtype, side, precision, sm, ones[, config index]) cases in a fresh interpreter-free process."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Largest shared memory per block: sm_90 (H100/H200, opt-in); the capability-8 lists
# also serve sm_86/sm_89 (consumer Ampere/Ada, 99 KB), so they must fit there.
_SMEM_LIMIT = {90: 232448, 80: 101376}


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (bundled ptxas) is not installed")
def test_every_autotune_config_fits_in_shared_memory():
    """A config that does not fit is dropped by the autotuner at run time; catch it at build time instead."""
    # The families with the largest tiles: fp64 (8-byte operands), TF32 and scaled bf16 operands (fp32 staging).
    families = [("fp64", torch.float64, "cols", "fp32"), ("fp32", torch.float32, "rows", "tf32"),
                ("fp32", torch.float32, "rows", "tf32x3"), ("fp32", torch.float32, "cols", "bf16")]
    cases = []
    for cap in _SMEM_LIMIT:
        for name, dtype, side, precision in families:
            dot = tiles.dot_mode(dtype, precision, scaled_operands=side == "cols")
            for index in range(len(tiles.cuda_configs((cap // 10, cap % 10), dot, dtype.itemsize))):
                cases.append(("gram", name, side, precision, cap, [], index))
    for case, kernel in zip(cases, _compile_ahead_of_time(cases)):
        assert 0 < kernel["shared"] <= _SMEM_LIMIT[case[4]], f"{case}: {kernel['shared']} bytes of shared memory"


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (bundled ptxas) is not installed")
def test_kernels_compile_for_hopper_and_ampere():
    """Every kernel family compiles for sm_90 / sm_80 and uses the arithmetic its precision promises."""
    cases = [c for c, _, _ in _AOT_CASES]
    cases += [c for pair in _TF32X3_PAIRS for c in pair[:2] if c not in cases]
    ptxs = {repr(c): k["ptx"] for c, k in zip(cases, _compile_ahead_of_time(cases))}
    for case, must, must_not in _AOT_CASES:
        for s in must:
            assert s in ptxs[repr(case)], f"{case}: expected {s!r} in the PTX"
        for s in must_not:
            assert s not in ptxs[repr(case)], f"{case}: unexpected {s!r} in the PTX"
    for tf32, tf32x3, mma in _TF32X3_PAIRS:
        cap = (tf32[4] // 10, tf32[4] % 10)
        assert [str(c) for c in tiles.cuda_configs(cap, tiles.DOT_TF32, 4)] == [
            str(c) for c in tiles.cuda_configs(cap, tiles.DOT_TF32X3, 4)]
        once = ptxs[repr(tf32)].count(mma)
        assert once > 0 and ptxs[repr(tf32x3)].count(mma) == 3 * once, (tf32x3, mma, once)
        assert "cvt.rna.tf32" not in ptxs[repr(tf32)] and "cvt.rna.tf32.f32" in ptxs[repr(tf32x3)], tf32x3
