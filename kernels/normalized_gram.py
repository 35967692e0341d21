"""Fused row norms + Gram of the unit-normalised rows of W, one triangle of tiles.

For W (n x d) with row norms ``r_i = ||w_i||`` and ``D = diag(1 / (r_i + 1e-8))``
(``sphere_fast.gram.NORM_EPS``), the Gram on the smaller side is

    side "rows" (n <= d):  G = D W W^T D / n        (n x n)
    side "cols" (n >  d):  C = W^T D^2 W / n        (d x d)

and ``trace = sum_i (r_i / (r_i + 1e-8))^2 / n`` for both (the Gram's eigenvalue
sum, known without an eigensolve).

Both sides are one kernel over an m x K "operand" X with m the Gram's size:
X = W on the rows side and X = W^T on the cols side, obtained by swapping
strides, never by copying. ``G = X Y`` with tiles of X and X^T, so

- rows side: ``acc = sum_k W[i,k] W[j,k]`` in fp32, then the diagonal scaling
  ``acc * s_i * s_j / n`` in the epilogue (s = 1 / (r + eps));
- cols side: the reduction runs over rows k of W, so each loaded tile is
  scaled by ``s_k`` before it enters the dot (``sum_k (s_k W[k,i]) (s_k W[k,j])``).

Only tiles (I, J) with I <= J are computed: program p is mapped to the p-th
tile of the upper triangle, and each off-diagonal tile is stored twice (at
(I, J) and transposed at (J, I)) from the same registers, while a diagonal tile
copies its upper half onto its lower half. The result is therefore exactly
symmetric, like the torch twin ``normalized_gram_reference``.

Layout of this file: the ``@triton.jit`` kernels, then the launchers, then the
public function. The tile walk, the tile dot and the autotuned launch, shared
with the energy kernel, are in :mod:`tiles`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphere_fast._validation import check_matrix, check_precision
from sphere_fast.gram import NORM_EPS, NormalizedGram, gram_side, trace_from_norms, work_dtype

from .tiles import check_device, dot_mode, gram_tile, interpreting, launch_kernel, tl_dtype, upper_tile

# ----------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------


@triton.jit
def _row_norms_kernel(
    # pointers
    w_ptr,  # W, n x d, any strides
    norms_ptr,  # out: ||w_i|| (fp32; fp64 for fp64 W), length n
    scale_ptr,  # out: 1 / (||w_i|| + eps), same dtype, length n
    # sizes
    n,
    d,
    # strides (elements)
    stride_wn,
    stride_wd,
    # meta-parameters
    EPS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``norms[i] = sqrt(sum_k W[i,k]^2)`` from W in its stored dtype, squares summed in ACC_DTYPE."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n
    cols = tl.arange(0, BLOCK_D)
    ptrs = w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wd
    sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
    for k0 in range(0, d, BLOCK_D):
        mask = row_mask[:, None] & ((k0 + cols) < d)[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        sq += x * x
        ptrs += BLOCK_D * stride_wd
    norm = _sqrt_rn(tl.sum(sq, axis=1), ACC_DTYPE)
    tl.store(norms_ptr + rows, norm, mask=row_mask)
    tl.store(scale_ptr + rows, _div_rn(1.0, norm + EPS, ACC_DTYPE), mask=row_mask)


@triton.jit
def _sqrt_rn(x, ACC_DTYPE: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is the fast approximate one in fp32)."""
    if ACC_DTYPE == tl.float64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _div_rn(x, y, ACC_DTYPE: tl.constexpr):
    """Correctly rounded division (fp32 ``/`` may lower to a 2-ulp division)."""
    if ACC_DTYPE == tl.float64:
        q = x / y
    else:
        q = tl.math.div_rn(x, y)
    return q


@triton.jit
def _normalized_gram_kernel(
    # pointers
    x_ptr,  # operand X (m x K): W (rows side) or W^T (cols side), by strides
    scale_ptr,  # s_i = 1 / (||w_i|| + eps), length n
    g_ptr,  # out: G, m x m, contiguous
    # sizes
    m,
    K,
    n,  # rows of W (the Gram is divided by n)
    # strides (elements)
    stride_xm,
    stride_xk,
    stride_gm,
    # meta-parameters
    SCALE_K: tl.constexpr,  # True on the cols side
    DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One upper-triangle tile of ``G = X diag X^T / n``, stored at (I, J) and mirrored to (J, I).

    rows side: ``G_ab = s_a s_b sum_k W_ak W_bk / n``; cols side:
    ``G_ab = sum_k s_k^2 W_ka W_kb / n``. The epilogue scales by ``s_a s_b``
    as one factor (a commutative product, so mirrored entries stay equal).
    """
    pid = tl.program_id(0).to(tl.int64)
    tile_i, tile_j = upper_tile(pid, tl.cdiv(m, BLOCK))
    acc = gram_tile(x_ptr, scale_ptr, tile_i, tile_j, m, K, stride_xm, stride_xk,
                    SCALE_K, DOT, INTERPRET, ACC_DTYPE, BLOCK, BLOCK_K)
    offs_i = tile_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = tile_j * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i < m
    mask_j = offs_j < m
    if tile_i == tile_j:
        # the dot need not be bitwise symmetric: keep the upper half, mirror it
        acc = tl.where(offs_i[:, None] <= offs_j[None, :], acc, tl.trans(acc))
    if not SCALE_K:
        s_i = tl.load(scale_ptr + offs_i, mask=mask_i, other=0.0)
        s_j = tl.load(scale_ptr + offs_j, mask=mask_j, other=0.0)
        acc = acc * (s_i[:, None] * s_j[None, :])
    acc = _div_rn(acc, tl.cast(n, ACC_DTYPE), ACC_DTYPE)
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(g_ptr + offs_i[:, None] * stride_gm + offs_j[None, :], acc, mask=mask)
    if tile_i != tile_j:
        mask_t = mask_j[:, None] & mask_i[None, :]
        tl.store(g_ptr + offs_j[:, None] * stride_gm + offs_i[None, :], tl.trans(acc), mask=mask_t)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


NORMS_CONFIG_INTERPRET = {"BLOCK_R": 16, "BLOCK_D": 32}
NORMS_CONFIG_CUDA = {"BLOCK_R": 16, "BLOCK_D": 256}


def row_norms(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, scale)``: ``||w_i||`` and ``1 / (||w_i|| + 1e-8)`` in fp32 (fp64 for fp64 W).

    A separate bandwidth-bound pass, by choice: it reads W once more, which is
    cheap beside the Gram (n d elements read against 2 n^2 d flops), whereas
    summing squares inside the Gram's main loop would redo that work in every
    one of the ~T/2 tile programs that load each row block, on CUDA cores
    beside the tensor cores; and every tile's epilogue (rows side) or main loop
    (cols side) needs the scales of rows owned by other programs.
    """
    n, d = W.shape
    norms = torch.empty(n, dtype=work_dtype(W.dtype), device=W.device)
    scale = torch.empty_like(norms)
    cfg = NORMS_CONFIG_INTERPRET if interpreting() else NORMS_CONFIG_CUDA
    grid = (triton.cdiv(n, cfg["BLOCK_R"]),)
    args = (W, norms, scale, n, d, W.stride(0), W.stride(1))
    if interpreting():
        _row_norms_kernel[grid](*args, EPS=NORM_EPS, ACC_DTYPE=tl_dtype(W.dtype), **cfg)
    else:
        with torch.cuda.device(W.device):
            _row_norms_kernel[grid](*args, EPS=NORM_EPS, ACC_DTYPE=tl_dtype(W.dtype), **cfg, num_warps=4)
    return norms, scale


def operand_view(W: torch.Tensor, side: str) -> tuple[int, int, int, int]:
    """``(m, K, stride_xm, stride_xk)`` of X = W (rows side) or X = W^T (cols side), by strides only."""
    n, d = W.shape
    if side == "rows":
        return n, d, W.stride(0), W.stride(1)
    return d, n, W.stride(1), W.stride(0)


# ----------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------


def normalized_gram(W: torch.Tensor, *, precision: str = "fp32") -> NormalizedGram:
    """Row norms, the Gram of the unit-normalised rows on the smaller side, and its trace.

    Parameters
    ----------
    W : (n, d) tensor, fp16 / bf16 / fp32 (fp64 also accepted), any strides,
        on a CUDA device (or CPU under ``TRITON_INTERPRET=1``). Read in its
        stored dtype; never copied.
    precision : "fp32" (default; IEEE fp32 dots, the fp32 accuracy contract),
        "tf32x3" (three TF32 tensor-core products per dot, near fp32 accuracy),
        "tf32" or "bf16" (tensor-core input precisions for fp32 operands; under
        the interpreter "tf32" runs as fp32 and "bf16" rounds operands to bf16).
        Unscaled fp16/bf16 tiles (rows side) use the tensor cores in every mode:
        their products are exact in fp32.

    Returns
    -------
    NormalizedGram with ``gram`` (m x m, fp32; fp64 for fp64 W; exactly
    symmetric), ``row_norms`` (n,), ``trace``, ``side``, ``n``, ``d``:
    ``side == "rows"`` (n <= d): ``gram = D W W^T D / n``; ``side == "cols"``:
    ``gram = W^T D^2 W / n``, with ``D = diag(1 / (||w_i|| + 1e-8))``.
    """
    check_matrix(W, "W", finite=False)
    check_device(W, "W")
    check_precision(precision)
    n, d = W.shape
    side = gram_side(n, d)
    norms, scale = row_norms(W)
    m, K, stride_xm, stride_xk = operand_view(W, side)
    G = torch.empty((m, m), dtype=work_dtype(W.dtype), device=W.device)
    dot = dot_mode(W.dtype, precision, scaled_operands=side == "cols")
    launch_kernel(
        _normalized_gram_kernel,
        W,
        m,
        dot,
        (W, scale, G, m, K, n, stride_xm, stride_xk, G.stride(0)),
        dict(SCALE_K=side == "cols", DOT=dot, ACC_DTYPE=tl_dtype(W.dtype)),
    )
    return NormalizedGram(G, norms, trace_from_norms(norms), side, n, d)
