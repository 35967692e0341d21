"""The shared checks: finiteness (a fast reduction with an exact fallback) and positive integers."""
import re
import warnings

import pytest
import torch

from sphere_fast._validation import all_finite, check_finite, check_positive_int


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
