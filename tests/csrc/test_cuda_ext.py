"""The CUDA extension sphere_fast._C against its torch twins and the float64 oracle.

GPU tests skip (with the reason) where there is no CUDA device or no built
extension; the loader's diagnostic is tested everywhere. Eigen-results are
checked by eigenvalues, residuals and orthogonality, never entry by entry.
"""
from __future__ import annotations

import ctypes
import math

import pytest
import torch

from sphere_fast import ConvergenceError, _cuda
from sphere_fast.accuracy import ORTHO_TOL, TOL_GAPPED, TOL_OVER_GAP, solver_bound
from sphere_fast.backends import backend_status
from sphere_fast.eigensolver import DEFAULT_TOL, top_eigenpairs as torch_top_eigenpairs
from sphere_fast.gram import normalized_gram_reference
from sphere_fast.reference import oracle


def extension_status() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    ok, why = backend_status("cuda", torch.device("cuda"))
    return None if ok else why


_SKIP = extension_status()
needs_ext = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
pytestmark = pytest.mark.cuda

EPS32 = torch.finfo(torch.float32).eps


# -- loader (CPU) ---------------------------------------------------------------


def test_missing_extension_diagnostic_names_what_and_how(monkeypatch):
    monkeypatch.setattr(_cuda, "EXTENSION_MODULE", "sphere_fast._C_absent_for_test")
    _cuda.load_extension.cache_clear()
    try:
        with pytest.raises(ImportError) as info:
            _cuda.load_extension()
    finally:
        _cuda.load_extension.cache_clear()
    msg = str(info.value)
    assert "sphere_fast._C_absent_for_test" in msg  # what was looked for
    assert "sphere_fast" in msg and ("no _C_absent_for_test" in msg)  # where, and what was (not) found
    assert "SPHERE_FAST_BUILD_CUDA=1 pip install -e ." in msg  # how to build it
    assert "nvcc" in msg


def test_importing_the_package_does_not_load_the_extension():
    import sys

    import sphere_fast  # noqa: F401

    # load_extension may have run in other tests; a fresh interpreter is the real check.
    code = "import sys, sphere_fast; print('sphere_fast._C' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_failed_device_allocation_is_retried_once_then_reported_as_oom():
    """CPU check of the retry wrapper around extension calls (no device needed)."""
    alloc = RuntimeError("cudaMallocAsync of 8 bytes: cudaErrorMemoryAllocation (out of memory)")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise alloc
        return "done"

    assert _cuda._with_memory_retry(flaky) == "done" and len(calls) == 2

    def always():
        calls.append(1)
        raise alloc

    calls.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError, match="after torch.cuda.empty_cache"):
        _cuda._with_memory_retry(always)
    assert len(calls) == 2

    def other():
        calls.append(1)
        raise RuntimeError("cusolverDnXsyevd: info = 3")

    calls.clear()
    with pytest.raises(RuntimeError, match="info = 3"):
        _cuda._with_memory_retry(other)
    assert len(calls) == 1  # only failed allocations are retried


# -- the TF32 premise (CPU) ------------------------------------------------------------

TF32_SWITCH = 0.5 * 2**-11  # csrc/eigensolver.cu kTf32Switch


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 explicit mantissa bits), round to nearest even, as the tensor cores read it."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def test_tf32_products_cannot_certify_fp32_but_converge_above_the_switch():
    """Why the CUDA solver refines in fp32: with TF32 products even the exact
    eigenvectors show residuals above the fp32 tolerance, and that floor sits
    well below the point where the solver hands over to fp32."""
    W = decaying_weight(384, 1024, decay=0.3, rank=128, noise=0.3, device="cpu")
    G = normalized_gram_reference(W).gram
    vals, vecs = torch.linalg.eigh(G.double())
    vals, vecs = vals.flip(0), vecs.flip(1)
    V = vecs[:, :48]
    tf32_GV = tf32_round(G).double() @ tf32_round(V).double()
    floor = torch.linalg.vector_norm(tf32_GV - V * vals[:48], dim=0) / vals[0]
    assert float(floor.max()) > DEFAULT_TOL[torch.float32]  # TF32 alone cannot meet tol
    # The hand-over comes before the floor (where a flatter spectrum lifts the
    # floor past the switch, the solver's stall rule hands over instead).
    assert float(floor.max()) < TF32_SWITCH
    fp32_GV = G.double() @ V.float().double()
    fp32_floor = torch.linalg.vector_norm(fp32_GV - V * vals[:48], dim=0) / vals[0]
    assert float(fp32_floor.max()) < DEFAULT_TOL[torch.float32] / 10  # fp32 products can


# -- the fp16 split premise (CPU) --------------------------------------------------------

SPLIT_SCALE = 2.0**12  # csrc/project.cu kSplitScale


def split(U: torch.Tensor, dtype, scale: float):
    """csrc/project.cu's _split_kernel: scale * U = hi + lo in a 16-bit dtype."""
    u = scale * U.float()
    hi = u.to(dtype)
    lo = (u - hi.float()).to(dtype)
    return hi, lo


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scaled_split_keeps_unit_columns_to_fp32_level(dtype):
    """Entries of unit columns are ~d^-1/2: unscaled, fp16's lo half (2^-11 of an entry)
    falls into fp16's subnormals and keeps a few bits; scaled by 2^12 both halves are
    normal numbers and hi + lo carries U to about 2^-22 (fp16) / 2^-16 (bf16)."""
    d, r = 14336, 8
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].float()
    U[:4, 0] = torch.tensor([1e-3, 1e-4, 3e-5, 1e-6])  # small entries, as real bases have
    bound = 2.0**-21 if dtype == torch.float16 else 2.0**-15

    def error(scale):
        hi, lo = split(U, dtype, scale)
        back = (hi.double() + lo.double()) / scale
        return float(torch.linalg.norm(back - U.double()) / torch.linalg.norm(U.double()))

    assert error(SPLIT_SCALE) <= bound
    assert bool(torch.isfinite(split(torch.ones(1, 1), dtype, SPLIT_SCALE)[0]).all())  # |u| <= 1 fits
    if dtype == torch.float16:
        assert error(1.0) > 4 * error(SPLIT_SCALE)  # what the scale is for


# -- inputs ------------------------------------------------------------------------


def decaying_weight(n: int, d: int, *, decay: float = 1.0, rank: int = 64, noise: float = 0.05, seed: int = 0,
                    device="cuda", dtype=torch.float32) -> torch.Tensor:
    """A weight with a decaying spectrum over a noise floor (like trained FFN weights)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    left = torch.randn(n, rank, generator=g, dtype=torch.float64)
    right = torch.randn(rank, d, generator=g, dtype=torch.float64)
    scale = torch.arange(1, rank + 1, dtype=torch.float64) ** (-decay)
    W = (left * scale) @ right / math.sqrt(d) + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return W.to(device=device, dtype=dtype)


def edited(W: torch.Tensor, *, rank: int = 8, size: float = 0.02, seed: int = 1) -> torch.Tensor:
    """W plus a small rank-`rank` update, as one editing batch produces."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d = W.shape
    a = torch.randn(n, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, d, generator=g, dtype=torch.float64)
    return W + (size * (a @ b) / math.sqrt(d)).to(W)


def check_contract(pairs, G: torch.Tensor, trace: float, eta: float, ref, *, tol: float):
    """Rank, eigenvalues, residuals, orthogonality and captured energy of a solve."""
    V = pairs.vectors.double()
    vals = pairs.values
    r = vals.numel()
    bound = solver_bound(pairs, G, tol)
    assert pairs.vectors.shape == (G.shape[0], r)
    assert pairs.vectors.dtype == G.dtype and vals.dtype == torch.float64
    assert r in ref.acceptable_ranks(eta), (r, ref.rank)
    assert bool((vals[:-1] >= vals[1:]).all()), "values must be descending"
    lam1 = float(ref.eigenvalues[0])
    # Against the fp64 oracle: the solver's bound plus the fp32 rounding of G.
    g_err = (8 * EPS32 if G.dtype == torch.float32 else 1e-13) * lam1
    value_err = (vals.cpu() - ref.eigenvalues[:r]).abs().max().item()
    assert value_err <= bound * lam1 + g_err, value_err / lam1
    # Residuals of the returned vectors against the G that was solved (fp64 arithmetic);
    # rounding the vectors to the working dtype adds up to 2 eps * theta_1.
    out_round = 2 * (EPS32 if G.dtype == torch.float32 else 2.3e-16) * float(vals[0])
    if pairs.method == "block":
        # The block method accepts on residuals of its working-precision product fl(G V), as the torch
        # twin (tests/test_eigensolver.py): a length-m dot rounds by about sqrt(m) eps ||G||_F per column.
        out_round += math.sqrt(G.shape[0]) * torch.finfo(G.dtype).eps * float(torch.linalg.matrix_norm(G.double()))
    residual = torch.linalg.vector_norm(G.double() @ V - V * vals, dim=0)
    assert float(residual.max()) <= bound * float(vals[0]) + out_round, float(residual.max()) / float(vals[0])
    ortho = (V.T @ V - torch.eye(r, dtype=torch.float64, device=V.device)).abs().max().item()
    assert ortho <= ORTHO_TOL[G.dtype], ortho
    assert float(vals.sum()) >= eta * trace * (1 - 1e-12)


# -- eigensolver (GPU) ----------------------------------------------------------------

SHAPES = [(123, 300), (257, 640), (300, 123)]  # odd sizes; the last uses the d x d side


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", ["block", "dense", "auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("eta", [0.5, 0.9])
def test_eigensolver_cold_matches_oracle_and_twin(shape, method, dtype, eta):
    W = decaying_weight(*shape, dtype=dtype)
    gram = normalized_gram_reference(W)
    ref = oracle(W.cpu(), eta)
    tol = DEFAULT_TOL[dtype]
    pairs = _cuda.top_eigenpairs(gram.gram, gram.trace, eta, method=method)
    if method != "auto":
        assert pairs.method == method
    check_contract(pairs, gram.gram, gram.trace, eta, ref, tol=tol)
    twin = torch_top_eigenpairs(gram.gram, gram.trace, eta, method=method)
    assert pairs.values.numel() in ref.acceptable_ranks(eta) and twin.values.numel() in ref.acceptable_ranks(eta)
    r = min(pairs.values.numel(), twin.values.numel())
    lam1 = float(ref.eigenvalues[0])
    bound = solver_bound(pairs, gram.gram, tol) + solver_bound(twin, gram.gram, tol)
    assert (pairs.values[:r].cpu() - twin.values[:r].cpu()).abs().max().item() <= bound * lam1


# A Gram where the block method is the right call (m = 768, fast decay, r = 5):
# auto must take it, cold and warm.
BLOCK_CASE = dict(n=768, d=2048, decay=1.0, rank=256, noise=0.02)


def block_case_weight(dtype=torch.float32) -> torch.Tensor:
    c = BLOCK_CASE
    return decaying_weight(c["n"], c["d"], decay=c["decay"], rank=c["rank"], noise=c["noise"], dtype=dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", ["block", "auto"])
def test_eigensolver_warm_start_after_an_edit(dtype, method):
    eta = 0.5
    W0 = block_case_weight(dtype)
    g0 = normalized_gram_reference(W0)
    cold = _cuda.top_eigenpairs(g0.gram, g0.trace, eta, method=method)
    assert cold.method == "block"
    check_contract(cold, g0.gram, g0.trace, eta, oracle(W0.cpu(), eta), tol=DEFAULT_TOL[dtype])
    W1 = edited(W0)
    g1 = normalized_gram_reference(W1)
    ref = oracle(W1.cpu(), eta)
    warm, stats = _cuda.top_eigenpairs(g1.gram, g1.trace, eta, method=method, init=cold.vectors, return_stats=True)
    assert warm.method == "block"
    check_contract(warm, g1.gram, g1.trace, eta, ref, tol=DEFAULT_TOL[dtype])
    recold = _cuda.top_eigenpairs(g1.gram, g1.trace, eta, method=method)
    assert warm.iterations <= recold.iterations
    assert stats["tf32_iterations"] == 0  # warm starts run in fp32 throughout


@needs_ext
def test_eigensolver_tf32_phase_hands_over_to_fp32():
    eta = 0.5
    W = decaying_weight(257, 640)
    gram = normalized_gram_reference(W)
    ref = oracle(W.cpu(), eta)
    fast, s_fast = _cuda.top_eigenpairs(gram.gram, gram.trace, eta, method="block", return_stats=True)
    exact, s_exact = _cuda.top_eigenpairs(gram.gram, gram.trace, eta, method="block", tf32=False, return_stats=True)
    for pairs, stats in ((fast, s_fast), (exact, s_exact)):
        check_contract(pairs, gram.gram, gram.trace, eta, ref, tol=DEFAULT_TOL[torch.float32])
        assert stats["iterations"] > stats["tf32_iterations"]  # the accepted iteration is fp32
        assert max(stats["residuals"]) <= DEFAULT_TOL[torch.float32] * float(pairs.values[0])
    assert s_exact["tf32_iterations"] == 0 and s_fast["tf32_iterations"] >= 1


@needs_ext
def test_eigensolver_rank_deficient_and_flat():
    # Rank-deficient Gram (n > rank): CholeskyQR falls back to Householder where needed.
    eta = 0.99
    W = decaying_weight(200, 400, rank=12, noise=0.0)
    gram = normalized_gram_reference(W)
    ref = oracle(W.cpu(), eta)
    pairs = _cuda.top_eigenpairs(gram.gram, gram.trace, eta, method="block")
    check_contract(pairs, gram.gram, gram.trace, eta, ref, tol=DEFAULT_TOL[torch.float32])
    # A flat spectrum: auto must still give a contract-meeting answer (via dense).
    W = torch.randn(150, 150, generator=torch.Generator().manual_seed(3)).cuda()
    gram = normalized_gram_reference(W)
    ref = oracle(W.cpu(), 0.5)
    pairs = _cuda.top_eigenpairs(gram.gram, gram.trace, 0.5, method="auto")
    check_contract(pairs, gram.gram, gram.trace, 0.5, ref, tol=DEFAULT_TOL[torch.float32])


@needs_ext
def test_eigensolver_accepts_a_transposed_view():
    W = decaying_weight(123, 300)
    gram = normalized_gram_reference(W)
    ref = oracle(W.cpu(), 0.5)
    pairs = _cuda.top_eigenpairs(gram.gram.T, gram.trace, 0.5, method="block")
    check_contract(pairs, gram.gram, gram.trace, 0.5, ref, tol=DEFAULT_TOL[torch.float32])


@needs_ext
def test_eigensolver_errors_raise_and_name_the_argument():
    W = decaying_weight(64, 128)
    G = normalized_gram_reference(W).gram
    trace = float(G.diagonal().sum())
    bad = G.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="G contains NaN or Inf"):
        _cuda.top_eigenpairs(bad, trace, 0.5, method="block")
    with pytest.raises(ValueError, match="G must be square"):
        _cuda.top_eigenpairs(G[:, :10], trace, 0.5)
    with pytest.raises(ValueError, match="G must be a CUDA tensor"):
        _cuda.top_eigenpairs(G.cpu(), trace, 0.5)
    with pytest.raises(TypeError, match="G must be"):
        _cuda.top_eigenpairs(G.half(), trace, 0.5)
    with pytest.raises(ValueError, match="method must be one of"):
        _cuda.top_eigenpairs(G, trace, 0.5, method="lanczos")
    with pytest.raises(ValueError, match="eta must be in"):
        _cuda.top_eigenpairs(G, trace, 1.5)
    with pytest.raises(ValueError, match="trace must be > 0"):
        _cuda.top_eigenpairs(G, -1.0, 0.5)
    with pytest.raises(ValueError, match="init must have shape"):
        _cuda.top_eigenpairs(G, trace, 0.5, init=torch.zeros(63, 4, device="cuda"))
    init = torch.zeros(64, 4, device="cuda")
    init[0, 0] = float("inf")
    with pytest.raises(ValueError, match="init contains NaN or Inf"):
        _cuda.top_eigenpairs(G, trace, 0.5, method="block", init=init)
    with pytest.raises(ConvergenceError, match="did not converge in 1 iterations"):
        _cuda.top_eigenpairs(G, trace, 0.5, method="block", max_iter=1, tol=1e-30)
    with pytest.raises(ValueError, match="seed must be an int"):
        _cuda.top_eigenpairs(G, trace, 0.5, seed=-1)


@needs_ext
@pytest.mark.parametrize("spectrum", ["steep", "gaussian"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_auto_picks_the_same_method_as_the_twin(spectrum, warm):
    """Both take auto's plan from sphere_fast.eigensolver.plan_auto and give up on the
    block method by its iterations_to_converge: on clear cases they end on the same method."""
    from sphere_fast.eigensolver import plan_auto, top_eigenpairs
    from sphere_fast.synthetic import synthetic_weight

    W = synthetic_weight(512, 1792, spectrum=spectrum, dtype=torch.float32, device="cpu")
    gram = normalized_gram_reference(W)
    init = top_eigenpairs(gram.gram, gram.trace, 0.5).vectors if warm else None
    G = gram.gram.cuda()
    plan = plan_auto(G, gram.trace, init_columns=None if init is None else init.shape[1])
    assert plan == plan_auto(gram.gram, gram.trace, init_columns=None if init is None else init.shape[1])
    assert plan.method == ("block" if spectrum == "steep" else "dense")
    twin = top_eigenpairs(gram.gram, gram.trace, 0.5, init=init)
    twin_on_gpu = top_eigenpairs(G, gram.trace, 0.5, init=None if init is None else init.cuda())
    ext = _cuda.top_eigenpairs(G, gram.trace, 0.5, init=None if init is None else init.cuda())
    assert ext.method == twin.method == twin_on_gpu.method == plan.method


# -- projection (GPU) ------------------------------------------------------------------

def split3_product(T: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """csrc/project.cu's tensor-core T U^T: [T_hi T_hi T_lo] [U_hi U_lo U_hi]^T in bf16, summed in fp32
    (a product of two bf16 numbers is exact in fp32)."""
    def halves(x):
        hi = x.float().to(torch.bfloat16)
        return hi, (x.float() - hi.float()).to(torch.bfloat16)

    (th, tl), (uh, ul) = halves(T), halves(U)
    t3 = torch.cat([th, th, tl], dim=1).float()
    u3 = torch.cat([uh, ul, uh], dim=1).float()
    return t3 @ u3.T


def test_split3_product_is_far_below_a_16_bit_rounding():
    """The second product on tensor cores: about 2^-16 of |T| |U|, under fp16's 2^-11 and bf16's 2^-8."""
    g = torch.Generator().manual_seed(4)
    n, d, r = 96, 700, 80
    U = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    T = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.logspace(0, -6, r, dtype=torch.float64)
    exact = T @ U.T
    err = split3_product(T.float(), U.float()).double() - exact
    scale = T.abs() @ U.abs().T
    assert float((err.abs() / scale).max()) <= 2.0**-14
    assert float(torch.linalg.norm(err) / torch.linalg.norm(exact)) <= 2.0**-15
    plain = (T.float().to(torch.bfloat16).float() @ U.float().to(torch.bfloat16).float().T).double() - exact
    assert float(torch.linalg.norm(plain)) > 50 * float(torch.linalg.norm(err))  # what the split is for


def test_tensor_core_plan():
    assert _cuda.tensor_core_plan(4096, 14336, 63, torch.bfloat16) is None  # below the rank: FMA kernel
    for dtype in (torch.float32, torch.float64):
        assert _cuda.tensor_core_plan(4096, 14336, 500, dtype) is None  # fp32 contract: fp32 products
    for n, d, r in [(4096, 14336, 64), (14336, 4096, 1000), (100, 50, 333), (1, 1 << 20, 70)]:
        for dtype in (torch.float16, torch.bfloat16):
            ld3, c_rows = _cuda.tensor_core_plan(n, d, r, dtype)
            assert ld3 >= 3 * r and ld3 % _cuda.SPLIT_ALIGN == 0 and ld3 - 3 * r < _cuda.SPLIT_ALIGN
            assert 1 <= c_rows <= n and (c_rows == n or c_rows % 128 == 0)
            assert 4 * c_rows * d <= max(_cuda.TENSOR_CORE_CHUNK_BYTES, 4 * 128 * d)
    assert _cuda.tensor_core_plan(14336, 4096, 1000, torch.bfloat16)[1] == 4096  # 64 MiB of fp32 rows


# Relative Frobenius error against the fp64 result: the output dtype's rounding
# (bf16 2^-8, fp16 2^-11) or the fp32/fp64 accumulation.
PROJECT_TOL = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2e-6, torch.float64: 1e-12}
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _basis(d: int, r: int, dtype, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].to("cuda", dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.float64], ids=["U32", "U64"])
@pytest.mark.parametrize("shape", [(123, 300, 17), (257, 1000, 130), (1, 129, 1)], ids=str)
def test_project_matches_fp64(shape, dtype, u_dtype):
    n, d, r = shape
    alpha = 0.8
    B = torch.randn(n, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to("cuda", dtype)
    U = _basis(d, r, u_dtype)
    out = _cuda.project(B, U, alpha)
    assert out.dtype == dtype and out.shape == B.shape
    B64, U64 = B.double(), U.double()
    ref = B64 - alpha * (B64 @ U64) @ U64.T
    assert _rel(out, ref) <= PROJECT_TOL[dtype]
    # The torch twin agrees as well, computed in the promoted dtype (fp64 when
    # either B or U is: an fp32 twin could not meet fp64's tolerance).
    work = torch.promote_types(dtype, u_dtype)
    Bw, Uw = B.to(work), U.to(work)
    twin = (Bw - alpha * (Bw @ Uw) @ Uw.T).to(dtype)
    assert _rel(out, twin.double()) <= 2 * PROJECT_TOL[dtype]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_project_tensor_core_path_in_chunks(dtype):
    """n above one chunk of C: several GEMM + epilogue rounds, into out and in place."""
    n, d, r = 5000, 4096, 80
    assert _cuda.tensor_core_plan(n, d, r, dtype)[1] < n
    g = torch.Generator().manual_seed(17)
    B = torch.randn(n, d, generator=g, dtype=torch.float64).to("cuda", dtype)
    U = _basis(d, r, torch.float32)
    ref = B.double() - 0.5 * (B.double() @ U.double()) @ U.double().T
    assert _rel(_cuda.project(B, U, 0.5), ref) <= PROJECT_TOL[dtype]
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to("cuda", dtype)
    ref = W.double() + ref
    _cuda.project_add_(W, B, U, 0.5)
    assert _rel(W, ref) <= PROJECT_TOL[dtype]


@needs_ext
@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("r", [33, 96], ids=["fma", "tensor_core"])
def test_project_add_in_place(w_dtype, b_dtype, r):
    n, d = 190, 515
    alpha = 0.5
    g = torch.Generator().manual_seed(11)
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to("cuda", w_dtype)
    B = (0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)).to("cuda", b_dtype)
    U = _basis(d, r, torch.float32)
    ref = W.double() + B.double() - alpha * (B.double() @ U.double()) @ U.double().T
    ptr = W.data_ptr()
    result = _cuda.project_add_(W, B, U, alpha)
    assert result is W and W.data_ptr() == ptr
    # One rounding to W's dtype (fp32 B carries its accumulation error too).
    # One rounding to W's dtype; the update is accumulated in fp32 (B is not fp64).
    assert _rel(W, ref) <= max(PROJECT_TOL[w_dtype], PROJECT_TOL[torch.float32])


@needs_ext
def test_project_strided_operands():
    n, d, r = 140, 260, 20
    g = torch.Generator().manual_seed(13)
    big = torch.randn(n, d + 40, generator=g).cuda()
    B = big[:, 7 : 7 + d]  # row stride d + 40
    Bt = torch.randn(d, n, generator=g).cuda().T  # column-major B
    U = _basis(d, r, torch.float32)
    for b in (B, Bt):
        ref = b.double() - 0.8 * (b.double() @ U.double()) @ U.double().T
        assert _rel(_cuda.project(b, U, 0.8), ref) <= PROJECT_TOL[torch.float32]
    # In-place on a strided W (a column slice of a larger weight) leaves the rest alone.
    Wbig = torch.randn(n, d + 40, generator=g).cuda()
    before = Wbig.clone()
    W = Wbig[:, 3 : 3 + d]
    ref = W.double() + B.double() - 0.8 * (B.double() @ U.double()) @ U.double().T
    _cuda.project_add_(W, B, U, 0.8)
    assert _rel(W, ref) <= PROJECT_TOL[torch.float32]
    assert torch.equal(Wbig[:, :3], before[:, :3]) and torch.equal(Wbig[:, 3 + d :], before[:, 3 + d :])
    # Transposed W: column stride != 1.
    Wt = torch.randn(d, n, generator=g).cuda().T
    ref = Wt.double() + B.double() - 0.8 * (B.double() @ U.double()) @ U.double().T
    _cuda.project_add_(Wt, B, U, 0.8)
    assert _rel(Wt, ref) <= PROJECT_TOL[torch.float32]


@needs_ext
def test_project_errors_raise_and_leave_w_unchanged():
    B = torch.randn(10, 20, device="cuda")
    U = _basis(20, 3, torch.float32)
    W = torch.randn(10, 20, device="cuda")
    before = W.clone()
    with pytest.raises(ValueError, match="U must have 20 rows"):
        _cuda.project(B, U[:19], 0.5)
    with pytest.raises(TypeError, match="U must be"):
        _cuda.project(B, U.half(), 0.5)
    with pytest.raises(ValueError, match="B must be a CUDA tensor"):
        _cuda.project(B.cpu(), U, 0.5)
    with pytest.raises(ValueError, match="alpha must be finite"):
        _cuda.project(B, U, float("nan"))
    with pytest.raises(ValueError, match="W and B must have the same shape"):
        _cuda.project_add_(W[:, :19], B, U, 0.5)
    with pytest.raises(TypeError, match="W must be"):
        _cuda.project_add_(W.int(), B, U, 0.5)
    with pytest.raises(ValueError, match="W must not be an expanded"):
        _cuda.project_add_(torch.zeros(20, device="cuda").expand(10, 20), B, U, 0.5)
    assert torch.equal(W, before)


@needs_ext
def test_project_into_an_overlapping_view_of_b():
    """out may alias B exactly or overlap it partially (a transposed view): the result is as if B were copied."""
    U = _basis(64, 5, torch.float32)
    B = torch.randn(64, 64, device="cuda")
    expected = B - 0.5 * (B @ U) @ U.T
    same = B.clone()
    _cuda.project(same, U, 0.5, out=same)
    assert _rel(same, expected) <= PROJECT_TOL[torch.float32]
    square = B.clone()
    out = square.T  # the same storage, transposed
    _cuda.project(square, U, 0.5, out=out)
    assert _rel(out, expected) <= PROJECT_TOL[torch.float32]


@needs_ext
def test_project_more_row_tiles_than_grid_y_holds():
    """More than 65535 tiles of 128 rows: the FMA kernel's tiles run along grid x."""
    n, d, r = 65535 * 128 + 77, 5, 2
    B = torch.randn(n, d, generator=torch.Generator().manual_seed(29)).cuda()
    U = _basis(d, r, torch.float32)
    ref = B.double() - 0.8 * (B.double() @ U.double()) @ U.double().T
    out = _cuda.project(B, U, 0.8)
    assert _rel(out, ref) <= PROJECT_TOL[torch.float32]
    # The last rows, those of tiles past grid y's limit, on their own.
    assert _rel(out[-200:], ref[-200:]) <= PROJECT_TOL[torch.float32]


CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation


def _extension_runtime() -> ctypes.CDLL:
    """The CUDA runtime sphere_fast._C calls: it links libcudart.so dynamically, and symbols looked up through its
    handle come from it or its dependencies (of which only libcudart exports the runtime API)."""
    lib = ctypes.CDLL(_cuda.load_extension().__file__)
    lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    lib.cudaMalloc.restype = ctypes.c_int
    lib.cudaPeekAtLastError.restype = ctypes.c_int
    return lib


@needs_ext
def test_an_earlier_failed_allocation_does_not_fail_project_add_or_apply_it_twice():
    """A failed cudaMalloc leaves its error for the runtime's cudaGetLastError. project_add_ must not report it
    after writing W: the OOM retry would then apply the update a second time."""
    n, d, r = 123, 300, 17
    g = torch.Generator().manual_seed(23)
    W = torch.randn(n, d, generator=g).cuda()
    B = torch.randn(n, d, generator=g).cuda()  # fp32 B: its first launch check used to follow the kernel writing W
    U = _basis(d, r, torch.float32)
    once = W.double() + B.double() - 0.7 * (B.double() @ U.double()) @ U.double().T
    runtime = _extension_runtime()
    torch.cuda.synchronize()
    ptr = ctypes.c_void_p()
    assert runtime.cudaMalloc(ctypes.byref(ptr), 1 << 50) == CUDA_ERROR_MEMORY_ALLOCATION
    assert runtime.cudaPeekAtLastError() == CUDA_ERROR_MEMORY_ALLOCATION  # left for the extension to see
    _cuda.project_add_(W, B, U, 0.7)
    assert _rel(W, once) <= PROJECT_TOL[torch.float32]


def assert_projector_contract(proj, W: torch.Tensor, B: torch.Tensor, eta: float, alpha: float) -> None:
    """The projector's rank and ||B_proj - B_proj64|| / ||B|| against the float64 oracle of W."""
    ref = oracle(W.cpu(), eta)
    assert proj.rank in ref.acceptable_ranks(eta), (proj.rank, ref.rank)
    exact = ref.project(B.cpu(), alpha, proj.rank)
    err = float(torch.linalg.norm(proj.apply(B).cpu().double() - exact) / torch.linalg.norm(B.cpu().double()))
    gap = ref.gap(proj.rank)
    assert err <= (TOL_GAPPED[torch.float32] if gap >= 1e-4 else TOL_OVER_GAP[torch.float32] / gap), (err, gap)


@needs_ext
def test_projector_on_the_cuda_backend_meets_the_contract():
    from sphere_fast import SphereProjector

    eta, alpha = 0.5, 0.8
    W = decaying_weight(257, 640)
    proj = SphereProjector.fit(W, eta, alpha, backend="cuda")
    B = torch.randn(64, 640, generator=torch.Generator().manual_seed(2)).cuda()
    assert_projector_contract(proj, W, B, eta, alpha)
    W1 = edited(W)
    proj.refit(W1)  # warm-started from the first fit's basis
    assert proj.method in ("block", "dense") and proj.shape == tuple(W1.shape)
    assert_projector_contract(proj, W1, B, eta, alpha)
