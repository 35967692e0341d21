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

Layout of this file: the ``@triton.jit`` kernels, then the launchers (grid and
block sizes, autotune lists per architecture), then the public function.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sphere_fast.gram import NORM_EPS, NormalizedGram, gram_side, trace_from_norms
from sphere_fast.ops import PRECISIONS

# How a tile pair enters tl.dot (the kernels' DOT meta-parameter). tl.constexpr,
# so that the kernels can compare against these names (Triton reads only
# constexpr globals inside @triton.jit code).
DOT_NATIVE16 = tl.constexpr(0)  # fp16/bf16 tiles as loaded: products are exact in fp32, fp32 accumulation
DOT_IEEE = tl.constexpr(1)  # fp32 (or fp64) operands, full-precision FMA dot
DOT_TF32 = tl.constexpr(2)  # fp32 operands on tensor cores in TF32
DOT_BF16 = tl.constexpr(3)  # operands rounded to bf16, tensor cores, fp32 accumulation
DOT_TF32X3 = tl.constexpr(4)  # fp32 operands split into TF32 high + low parts: three tensor-core dots, ~fp32 accuracy


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
def _upper_tile(pid, num_tiles):
    """Tile (I, J), I <= J, of the p-th entry of the upper triangle of a T x T tile grid.

    Entries are numbered column by column (J = 0, 1, ...; I = 0..J), so
    J = floor((sqrt(8p + 1) - 1) / 2) and I = p - J (J + 1) / 2. The square root
    is taken in fp64 and corrected by one step either way against rounding.
    """
    j = ((tl.sqrt((8 * pid + 1).to(tl.float64)) - 1.0) * 0.5).to(tl.int64)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = tl.minimum(j, num_tiles - 1)
    i = pid - j * (j + 1) // 2
    return i, j


@triton.jit
def _tile_dot(a, b, acc, DOT: tl.constexpr, INTERPRET: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc += a @ b in the input precision DOT (see the DOT_* constants), accumulated in ACC_DTYPE.

    ``out_dtype`` is always passed: Triton 3.6 defaults it to fp32 and rejects an
    fp64 accumulator otherwise.

    The Triton interpreter computes bf16 dots wrongly (and truncates fp32 ->
    bf16 casts), so there every 16-bit operand is widened to fp32 first and
    DOT_BF16 rounds to nearest-even bf16 values kept in fp32: products of
    16-bit values are exact in fp32, so this is the same arithmetic as the
    tensor cores' fp32-accumulate dot (TF32 and 3xTF32 are not emulated: they run
    as IEEE fp32).
    """
    if INTERPRET:
        if DOT == DOT_NATIVE16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if DOT == DOT_BF16:
            a = _round_to_bf16(a.to(tl.float32))
            b = _round_to_bf16(b.to(tl.float32))
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
    else:
        if DOT == DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
        elif DOT == DOT_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32", out_dtype=ACC_DTYPE)
        elif DOT == DOT_BF16:
            # fp32 -> bf16 rounds to nearest even
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=ACC_DTYPE)
        elif DOT == DOT_TF32X3:
            acc = tl.dot(a, b, acc, input_precision="tf32x3", out_dtype=ACC_DTYPE)
        else:  # DOT_NATIVE16
            acc = tl.dot(a, b, acc, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _round_to_bf16(x):
    """fp32 -> nearest bf16 (ties to even), kept in fp32: the interpreter's own cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gram_tile(
    x_ptr,
    scale_ptr,
    tile_i,
    tile_j,
    m,
    K,
    stride_xm,
    stride_xk,
    SCALE_K: tl.constexpr,
    DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc[a, b] = sum_k X[I*B + a, k] X[J*B + b, k]`` (times s_k^2 when SCALE_K).

    Out-of-range rows and k are loaded as 0 and contribute nothing.
    """
    offs_i = tile_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = tile_j * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < m
    mask_j = offs_j < m
    # a: BLOCK x BLOCK_K rows of X; bt: BLOCK_K x BLOCK, the transposed rows of X
    a_ptrs = x_ptr + offs_i[:, None] * stride_xm + offs_k[None, :] * stride_xk
    b_ptrs = x_ptr + offs_k[:, None] * stride_xk + offs_j[None, :] * stride_xm
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        if SCALE_K:
            # cols side: the reduction index is W's row index, weight s_k on both factors
            s_k = tl.load(scale_ptr + k0 + offs_k, mask=mask_k, other=0.0)
            a = a.to(ACC_DTYPE) * s_k[None, :]
            bt = bt.to(ACC_DTYPE) * s_k[:, None]
        acc = _tile_dot(a, bt, acc, DOT, INTERPRET, ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk
    return acc


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
    tile_i, tile_j = _upper_tile(pid, tl.cdiv(m, BLOCK))
    acc = _gram_tile(x_ptr, scale_ptr, tile_i, tile_j, m, K, stride_xm, stride_xk,
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


def interpreting() -> bool:
    """Whether this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_normalized_gram_kernel, InterpretedFunction)


def check_input(W: torch.Tensor, name: str = "W") -> None:
    """W must be a 2-D fp16/bf16/fp32/fp64 tensor on a device these kernels can run on."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(W.shape)}")
    if W.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(W.shape)}")
    if W.device.type == "cuda":
        if interpreting():
            raise RuntimeError(
                f"{name} is a CUDA tensor but sphere_fast.kernels was imported with TRITON_INTERPRET=1; "
                "unset it before importing to run on the GPU"
            )
    elif W.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                f"{name} is a CPU tensor: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set "
                "before sphere_fast.kernels is imported"
            )
    else:
        raise RuntimeError(f"{name} must be on a CUDA device (or CPU under TRITON_INTERPRET=1), got {W.device}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_mode(dtype: torch.dtype, precision: str, *, scaled_operands: bool) -> tl.constexpr:
    """The DOT_* mode for W's dtype, the requested precision and whether tiles are scaled before the dot.

    Unscaled 16-bit tiles always go to the tensor cores as loaded (exact
    products, fp32 accumulation: the fp32 contract holds for every precision).
    Scaled tiles are fp32 and follow ``precision``; fp64 is always IEEE fp64.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if dtype == torch.float64:
        return DOT_IEEE
    if dtype in (torch.float16, torch.bfloat16) and not scaled_operands:
        return DOT_NATIVE16
    return {"fp32": DOT_IEEE, "tf32": DOT_TF32, "tf32x3": DOT_TF32X3, "bf16": DOT_BF16}[precision]


def num_upper_tiles(m: int, block: int) -> int:
    t = triton.cdiv(m, block)
    return t * (t + 1) // 2


# Interpreter: one small config (autotuning under the interpreter is slow);
# small tiles so that small test shapes still span several tiles and a K tail.
INTERPRET_CONFIG = {"BLOCK": 16, "BLOCK_K": 16}
NORMS_CONFIG_INTERPRET = {"BLOCK_R": 16, "BLOCK_D": 32}
NORMS_CONFIG_CUDA = {"BLOCK_R": 16, "BLOCK_D": 256}


def _cfg(block, block_k, warps, stages):
    return triton.Config({"BLOCK": block, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


def cuda_configs(capability: tuple[int, int], dot: tl.constexpr, elem_bytes: int) -> list:
    """Short autotune lists per architecture and operand family (tensor cores or FMA)."""
    tensor_cores = dot in (DOT_NATIVE16, DOT_TF32, DOT_TF32X3, DOT_BF16)
    bk = 64 if elem_bytes <= 2 else 32
    if capability[0] >= 9:  # Hopper: wgmma likes 128 x 128 tiles with 8 warps; 228 KB smem
        if tensor_cores:
            return [_cfg(128, bk, 8, 3), _cfg(128, bk, 8, 4), _cfg(64, bk, 4, 4)]
        return [_cfg(64, 32, 4, 3), _cfg(128, 32, 8, 3), _cfg(64, 16, 4, 4)]
    # Ampere and others: mma.sync, 164 KB smem on A100, about 100 KB on consumer parts
    if tensor_cores:
        return [_cfg(128, bk, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, bk, 4, 4)]
    return [_cfg(64, 32, 4, 3), _cfg(64, 16, 4, 4), _cfg(128, 16, 8, 3)]


@functools.lru_cache(maxsize=None)
def _tuned(kernel, capability: tuple[int, int], dot: tl.constexpr, elem_bytes: int, reset: tuple[str, ...] = ()):
    """``kernel`` wrapped in triton.autotune for this architecture (built on first use, never at import)."""
    return triton.autotune(
        configs=cuda_configs(capability, dot, elem_bytes),
        key=["m", "K", "SCALE_K", "DOT"],
        reset_to_zero=list(reset) or None,
    )(kernel)


def launch_kernel(kernel, W: torch.Tensor, m: int, dot: tl.constexpr, args: tuple, kwargs: dict,
                  reset: tuple[str, ...] = ()):
    """Launch ``kernel`` over the upper triangle of tiles of an m x m result."""
    if interpreting():
        grid = (num_upper_tiles(m, INTERPRET_CONFIG["BLOCK"]),)
        kernel[grid](*args, **kwargs, **INTERPRET_CONFIG, INTERPRET=True)
        return INTERPRET_CONFIG["BLOCK"]
    tuned = _tuned(kernel, torch.cuda.get_device_capability(W.device), dot, W.element_size(), reset)
    grid = lambda meta: (num_upper_tiles(m, meta["BLOCK"]),)  # noqa: E731
    with torch.cuda.device(W.device):
        tuned[grid](*args, **kwargs, INTERPRET=False)
    return tuned.best_config.kwargs["BLOCK"]


def row_norms(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, scale)``: ``||w_i||`` and ``1 / (||w_i|| + 1e-8)`` in fp32 (fp64 for fp64 W).

    A separate bandwidth-bound pass, by choice: it reads W once more (117 MB
    for a bf16 [4096 x 14336] layer, ~25 us on an H200 against ~0.4 ms of
    Gram), whereas summing squares inside the Gram's main loop would redo that
    work in every one of the ~T/2 tile programs that load each row block, on
    CUDA cores beside the tensor cores; and every tile's epilogue (rows side)
    or main loop (cols side) needs the scales of rows owned by other programs.
    """
    n, d = W.shape
    norms = torch.empty(n, dtype=acc_dtype(W.dtype), device=W.device)
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
    check_input(W, "W")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n, d = W.shape
    side = gram_side(n, d)
    norms, scale = row_norms(W)
    m, K, stride_xm, stride_xk = operand_view(W, side)
    G = torch.empty((m, m), dtype=acc_dtype(W.dtype), device=W.device)
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
