"""What the Gram and energy kernels share: the upper-triangle tile walk, the tile dot, the launcher.

Both kernels compute tiles ``(I, J)``, ``I <= J``, of ``X X^T`` for an m x K
operand X read in its stored dtype (:func:`gram_tile`), one program per tile of
the upper triangle (:func:`upper_tile`), with the dot's input precision chosen
by a ``DOT`` meta-parameter (the ``DOT_*`` modes, :func:`dot_mode`). The host
side here picks the autotune lists per architecture (:func:`cuda_configs`) and
launches a kernel over the triangle (:func:`launch_kernel`); under
``TRITON_INTERPRET=1`` (set before import) everything runs on CPU tensors with
one small config.

Layout of this file: the modes, the ``@triton.jit`` helpers, then the host code.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sphere_fast._validation import check_precision

# How a tile pair enters tl.dot (the kernels' DOT meta-parameter). tl.constexpr,
# so that the kernels can compare against these names (Triton reads only
# constexpr globals inside @triton.jit code).
DOT_NATIVE16 = tl.constexpr(0)  # fp16/bf16 tiles as loaded: products are exact in fp32, fp32 accumulation
DOT_IEEE = tl.constexpr(1)  # fp32 (or fp64) operands, full-precision FMA dot
DOT_TF32 = tl.constexpr(2)  # fp32 operands on tensor cores in TF32
DOT_BF16 = tl.constexpr(3)  # operands rounded to bf16, tensor cores, fp32 accumulation
DOT_TF32X3 = tl.constexpr(4)  # fp32 operands split into TF32 high + low parts: three tensor-core dots, ~fp32 accuracy
TENSOR_CORE_DOTS = (DOT_NATIVE16, DOT_TF32, DOT_TF32X3, DOT_BF16)


# ----------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------


@triton.jit
def upper_tile(pid, num_tiles):
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
def round_to_bf16(x):
    """fp32 -> nearest bf16 (ties to even), kept in fp32: the interpreter's own cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def tile_dot(a, b, acc, DOT: tl.constexpr, INTERPRET: tl.constexpr, ACC_DTYPE: tl.constexpr):
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
            a = round_to_bf16(a.to(tl.float32))
            b = round_to_bf16(b.to(tl.float32))
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
def gram_tile(
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
        acc = tile_dot(a, bt, acc, DOT, INTERPRET, ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk
    return acc


# ----------------------------------------------------------------------------
# Host code
# ----------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether these kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(upper_tile, InterpretedFunction)


def check_device(W: torch.Tensor, name: str = "W") -> None:
    """W must be on a device these kernels run on: CUDA, or CPU under the interpreter."""
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


def tl_dtype(dtype: torch.dtype):
    """The accumulator's Triton dtype: fp64 for fp64 W, else fp32 (as :func:`sphere_fast.gram.work_dtype`)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_mode(dtype: torch.dtype, precision: str, *, scaled_operands: bool) -> tl.constexpr:
    """The DOT_* mode for W's dtype, the requested precision and whether tiles are scaled before the dot.

    Unscaled 16-bit tiles always go to the tensor cores as loaded (exact
    products, fp32 accumulation: the fp32 contract holds for every precision).
    Scaled tiles are fp32 and follow ``precision``; fp64 is always IEEE fp64.
    """
    check_precision(precision)
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


def _cfg(block, block_k, warps, stages):
    return triton.Config({"BLOCK": block, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


def cuda_configs(capability: tuple[int, int], dot: tl.constexpr, elem_bytes: int) -> list:
    """Short autotune lists per architecture and operand family (tensor cores or FMA)."""
    tensor_cores = dot in TENSOR_CORE_DOTS
    bk = 64 if elem_bytes <= 2 else 32
    if capability[0] >= 9:  # Hopper: wgmma likes 128 x 128 tiles with 8 warps; 228 KB smem
        if tensor_cores:
            return [_cfg(128, bk, 8, 3), _cfg(128, bk, 8, 4), _cfg(64, bk, 4, 4)]
        return [_cfg(64, 32, 4, 3), _cfg(128, 32, 8, 3), _cfg(64, 16, 4, 4)]
    # Ampere and others: mma.sync, 164 KB smem on A100, about 100 KB on consumer parts
    if tensor_cores:
        return [_cfg(128, bk, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, bk, 4, 4)]
    return [_cfg(64, 32, 4, 3), _cfg(64, 16, 4, 4), _cfg(128, 16, 8, 3)]


def smallest_block(W: torch.Tensor, dot: tl.constexpr) -> int:
    """The smallest BLOCK any config for W may run with (sizes per-tile buffers)."""
    if interpreting():
        return INTERPRET_CONFIG["BLOCK"]
    cap = torch.cuda.get_device_capability(W.device)
    return min(c.kwargs["BLOCK"] for c in cuda_configs(cap, dot, W.element_size()))


@functools.lru_cache(maxsize=None)
def _tuned(kernel, capability: tuple[int, int], dot: tl.constexpr, elem_bytes: int, reset: tuple[str, ...] = ()):
    """``kernel`` wrapped in triton.autotune for this architecture (built on first use, never at import)."""
    return triton.autotune(
        configs=cuda_configs(capability, dot, elem_bytes),
        key=["m", "K", "SCALE_K", "DOT"],
        reset_to_zero=list(reset) or None,
    )(kernel)


def launch_kernel(kernel, W: torch.Tensor, m: int, dot: tl.constexpr, args: tuple, kwargs: dict,
                  reset: tuple[str, ...] = ()) -> None:
    """Launch ``kernel`` over the upper triangle of tiles of an m x m result."""
    if interpreting():
        grid = (num_upper_tiles(m, INTERPRET_CONFIG["BLOCK"]),)
        kernel[grid](*args, **kwargs, **INTERPRET_CONFIG, INTERPRET=True)
        return
    tuned = _tuned(kernel, torch.cuda.get_device_capability(W.device), dot, W.element_size(), reset)
    grid = lambda meta: (num_upper_tiles(m, meta["BLOCK"]),)  # noqa: E731
    with torch.cuda.device(W.device):
        tuned[grid](*args, **kwargs, INTERPRET=False)
