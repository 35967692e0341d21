"""The shared checks: finiteness (a fast reduction with an exact fallback), integers, shapes, the eigensolver's
arguments."""
import re
import warnings

import pytest
import torch

from sphere_fast._validation import (
    all_finite,
    check_eig_args,
    check_finite,
    check_init,
    check_int_range,
    check_positive_int,
    check_same_shape,
    check_shape,
    check_square,
    check_update,
    check_writable,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_nan_or_inf_is_found(dtype, bad):
    for index in [(0, 0), (5, 17), (63, 63)]:
        x = torch.randn(64, 64).to(dtype)
        x[index] = bad
        assert not all_finite(x)
        with pytest.raises(ValueError, match="X contains NaN or Inf"):
            check_finite(x, "X")


def test_opposite_infinities_are_found():
    x = torch.zeros(8, 8)
    x[0, 0], x[7, 7] = float("inf"), float("-inf")
    assert not all_finite(x)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float64, 1.7e308)])
def test_finite_values_whose_sum_overflows_pass(dtype, big):
    x = torch.full((16, 16), big, dtype=dtype)
    assert not torch.isfinite(x.sum()).item()  # the fast reduction alone would be fooled
    assert all_finite(x)
    check_finite(x, "X")


def test_strided_input():
    x = torch.randn(32, 48).T[::2]
    assert all_finite(x)
    x = x.clone()
    x[3, 5] = float("nan")
    assert not all_finite(x.T)


def test_a_parameter_is_checked_without_autograd_or_warnings():
    W = torch.nn.Parameter(torch.randn(4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all_finite(W)
        W.data[1, 2] = float("nan")
        assert not all_finite(W)


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_positive_int_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match=rf"^steps must be a positive integer, got {re.escape(repr(value))}$"):
        check_positive_int(value, "steps")


def test_positive_int_passes_through_and_none_when_allowed():
    assert check_positive_int(7, "steps") == 7
    assert check_positive_int(None, "keep_last", none_ok=True) is None
    with pytest.raises(ValueError, match="keep_last must be a positive integer or None, got 0"):
        check_positive_int(0, "keep_last", none_ok=True)


def test_square_and_warm_start_checks_name_the_argument():
    G = torch.eye(4)
    assert check_square(G, "G") == 4
    with pytest.raises(ValueError, match=r"^G must be square, got shape \(4, 3\)$"):
        check_square(G[:, :3], "G")
    with pytest.raises(ValueError, match="^G contains NaN or Inf$"):
        check_square(torch.full((2, 2), float("inf")), "G")
    check_square(torch.full((2, 2), float("inf")), "G", finite=False)
    check_init(None, G)
    check_init(torch.eye(4, 2, dtype=torch.float64), G)
    message = re.escape("init must have shape (m, k) with m = 4 and 1 <= k <= m, got (4, 5)")
    with pytest.raises(ValueError, match=message):
        check_init(torch.zeros(4, 5), G)
    with pytest.raises(ValueError, match="^init contains NaN or Inf$"):
        check_init(torch.full((4, 1), float("nan")), G)


def test_eig_args_come_back_as_floats_and_the_value_scan_is_optional():
    G = torch.eye(3, dtype=torch.float64)
    args = dict(method="dense", methods=("auto", "dense"), init=None, tol=None, max_iter=5)
    assert check_eig_args(G, torch.tensor(3.0), 1, **args) == (3.0, 1.0, None)
    bad = G.clone()
    bad[0, 0] = float("nan")
    check_eig_args(bad, 3.0, 0.5, **args, finite=False)
    with pytest.raises(ValueError, match="^G contains NaN or Inf$"):
        check_eig_args(bad, 3.0, 0.5, **args)
    # Shapes and scalars are checked before any scan: a bad eta is reported even for a NaN G.
    with pytest.raises(ValueError, match=r"^eta must be in \(0, 1\], got 0.0$"):
        check_eig_args(bad, 3.0, 0.0, **args)


def test_shape_layout_and_update_checks_name_the_argument():
    W, B = torch.zeros(3, 5), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"^W and B must have the same shape, got W \(3, 5\) and B \(3, 4\)$"):
        check_same_shape(W=W, B=B)
    check_same_shape(W=W, B=W.clone())
    with pytest.raises(ValueError, match=r"^W_new must have the fitted shape \(3, 4\), got \(3, 5\)$"):
        check_shape(W, "W_new", (3, 4), "the fitted shape")
    with pytest.raises(ValueError, match=r"^out must not be an expanded \(stride-0\) view"):
        check_writable(torch.zeros(5).expand(3, 5), "out")
    check_writable(torch.zeros(1, 5).expand(1, 5), "out")  # a size-1 dimension shares nothing
    U = torch.zeros(5, 2)
    check_update(W, U)
    check_update(W, torch.zeros(5, 0, dtype=torch.float64))  # rank 0: nothing to project out
    with pytest.raises(ValueError, match=r"^U must have 4 rows \(as many as B has columns\), got shape \(5, 2\)$"):
        check_update(B, U)
    with pytest.raises(TypeError, match="^U must be float32 or float64, got torch.float16$"):
        check_update(W, U.half())
    with pytest.raises(ValueError, match="^tensors must be on one device, got B on cpu, U on meta$"):
        check_update(W, torch.empty(5, 2, device="meta"))
    with pytest.raises(ValueError, match="^B contains NaN or Inf$"):
        check_update(torch.full((3, 5), float("nan")), U)


@pytest.mark.parametrize("value, low, high, message", [
    (-1, 0, 2**64, "seed must be an int in [0, 2**64), got -1"),
    (2**64, 0, 2**64, "seed must be an int in [0, 2**64), got 18446744073709551616"),
    (True, 0, None, "seed must be an int >= 0, got True"),
    (1.0, 0, 10, "seed must be an int in [0, 10), got 1.0"),
])
def test_int_range_is_refused_with_its_name(value, low, high, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_int_range(value, "seed", low, high)


def test_int_range_passes_through_and_none_when_allowed():
    assert check_int_range(0, "oversample", 0) == 0
    assert check_int_range(2**64 - 1, "seed", 0, 2**64) == 2**64 - 1
    assert check_int_range(None, "oversample", 0, none_ok=True) is None
    with pytest.raises(ValueError, match=re.escape("oversample must be an int >= 0 or None, got -2")):
        check_int_range(-2, "oversample", 0, none_ok=True)
