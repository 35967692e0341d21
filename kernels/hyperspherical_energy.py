"""Hyperspherical energy of W's unit-normalised rows, without storing the n x n cosines.

With ``a_hat_i = w_i / (||w_i|| + 1e-8)`` and ``cos_ij = <a_hat_i, a_hat_j>`` (the
rows-side Gram tiles of :mod:`normalized_gram`, times n, whatever n vs d),

    E = sum_{i != j} (max(2 - 2 cos_ij, 0) + eps)^(-s/2)

(paper Eq. 6, Riesz s-kernel; ``2 - 2 cos_ij = ||a_hat_i - a_hat_j||^2`` for unit
rows). Each program computes one upper-triangle tile (I <= J) of the cosines in
fp32 (fp64 for fp64 W), turns the entries with a < b into kernel values in the
epilogue, and writes their sum, doubled (the pair (b, a) has the same value), to
a buffer of per-tile partials that the host sums in fp64. Both terms of a pair
thus come from one cosine, as ``normalized_gram`` stores one value for (a, b) and (b, a).

Layout: the ``@triton.jit`` kernel, the launcher, the public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphere_fast._validation import check_matrix, check_positive
from sphere_fast.gram import work_dtype

from .normalized_gram import row_norms
from .tiles import (
    check_device,
    dot_mode,
    gram_tile,
    launch_kernel,
    num_upper_tiles,
    smallest_block,
    tl_dtype,
    upper_tile,
)


@triton.jit
def _hyperspherical_energy_kernel(
    # pointers
    w_ptr,  # W, n x d, any strides
    scale_ptr,  # s_i = 1 / (||w_i|| + eps_norm), length n
    params_ptr,  # [-s/2, eps] in the accumulator dtype
    partial_ptr,  # out: one partial sum per upper-triangle tile (zero-initialised)
    # sizes
    num_partials,  # length of the partial buffer
    m,  # n (the Gram is n x n)
    K,  # d
    # strides (elements)
    stride_wn,
    stride_wd,
    # meta-parameters
    SCALE_K: tl.constexpr,  # always False here (rows side), kept for the shared autotune key
    DOT: tl.constexpr,
    INTERPRET: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``partial[p] = 2 * sum_{a < b in tile p} (max(2 - 2 cos_ab, 0) + eps)^(-s/2)``.

    ``cos_ab = s_a s_b sum_k W_ak W_bk``; padding rows and the diagonal a == b are masked out.
    """
    pid = tl.program_id(0).to(tl.int64)
    tile_i, tile_j = upper_tile(pid, tl.cdiv(m, BLOCK))
    acc = gram_tile(w_ptr, scale_ptr, tile_i, tile_j, m, K, stride_wn, stride_wd,
                    SCALE_K, DOT, INTERPRET, ACC_DTYPE, BLOCK, BLOCK_K)
    offs_i = tile_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = tile_j * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i < m
    mask_j = offs_j < m
    s_i = tl.load(scale_ptr + offs_i, mask=mask_i, other=0.0)
    s_j = tl.load(scale_ptr + offs_j, mask=mask_j, other=0.0)
    neg_half_s = tl.load(params_ptr)  # two scalars, always present
    eps = tl.load(params_ptr + 1)
    cos = acc * (s_i[:, None] * s_j[None, :])
    dist2 = tl.maximum(2.0 - 2.0 * cos, 0.0)
    terms = tl.exp(tl.log(dist2 + eps) * neg_half_s)
    # Pairs a < b only, each counted for (a, b) and (b, a) from one cosine, as the
    # Gram kernel mirrors: in a diagonal tile the dot's (a, b) and (b, a) entries
    # may round differently. Off-diagonal tiles (I < J) have a < b everywhere.
    valid = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] < offs_j[None, :])
    terms = tl.where(valid, terms, 0.0)
    total = 2.0 * tl.sum(tl.sum(terms, axis=1), axis=0)
    tl.store(partial_ptr + pid, total, mask=pid < num_partials)


def hyperspherical_energy(W: torch.Tensor, *, s: float, eps: float) -> torch.Tensor:
    """Hyperspherical energy ``sum_{i != j} (max(2 - 2 cos_ij, 0) + eps)^(-s/2)`` of W's rows.

    Parameters
    ----------
    W : (n, d) tensor, fp16 / bf16 / fp32 (fp64 also accepted), any strides,
        on a CUDA device (or CPU under ``TRITON_INTERPRET=1``); read in its
        stored dtype, never copied. Rows are normalised by ``1 / (||w|| + 1e-8)``.
    s : Riesz exponent, > 0.
    eps : regulariser added to the squared distance, > 0.

    Returns
    -------
    0-d float64 tensor on W's device: per-tile partial sums (fp32, or fp64 for
    fp64 W) added up in float64.
    """
    check_matrix(W, "W", finite=False)
    check_device(W, "W")
    s = check_positive(s, "s")
    eps = check_positive(eps, "eps")
    n, d = W.shape
    work = work_dtype(W.dtype)
    _, scale = row_norms(W)
    params = torch.tensor([-0.5 * s, eps], dtype=work, device=W.device)
    dot = dot_mode(W.dtype, "fp32", scaled_operands=False)
    # sized for the smallest tile of any config; unused entries stay zero
    partials = torch.zeros(num_upper_tiles(n, smallest_block(W, dot)), dtype=work, device=W.device)
    launch_kernel(
        _hyperspherical_energy_kernel,
        W,
        n,
        dot,
        (W, scale, params, partials, partials.numel(), n, d, W.stride(0), W.stride(1)),
        dict(SCALE_K=False, DOT=dot, ACC_DTYPE=tl_dtype(W.dtype)),
        reset=("partial_ptr",),
    )
    return partials.sum(dtype=torch.float64)
