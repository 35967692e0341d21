"""Property tests (hypothesis): P = I - alpha U U^T is a contraction, idempotent at
alpha = 1, and apply is linear in B."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphere_fast import SphereProjector

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
seeds = st.integers(0, 2**31 - 1)


def fitted(n, d, seed, eta, alpha, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g, dtype=dtype)
    return SphereProjector.fit(W, eta, alpha), g


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=shapes, m=st.integers(1, 10), seed=seeds, eta=st.floats(0.01, 1.0), alpha=st.floats(0.0, 1.0))
def test_contraction(shape, m, seed, eta, alpha):
    P, g = fitted(*shape, seed, eta, alpha)
    B = torch.randn(m, shape[1], generator=g, dtype=torch.float64)
    assert float(P.apply(B).norm()) <= float(B.norm()) * (1 + 1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=shapes, m=st.integers(1, 10), seed=seeds, eta=st.floats(0.01, 1.0))
def test_idempotent_at_alpha_one(shape, m, seed, eta):
    P, g = fitted(*shape, seed, eta, 1.0)
    B = torch.randn(m, shape[1], generator=g, dtype=torch.float64)
    once = P.apply(B)
    torch.testing.assert_close(P.apply(once), once, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=shapes,
    m=st.integers(1, 10),
    seed=seeds,
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
    alpha=st.floats(0.0, 1.0),
)
def test_apply_is_linear(shape, m, seed, a, b, alpha):
    P, g = fitted(*shape, seed, 0.5, alpha)
    X = torch.randn(m, shape[1], generator=g, dtype=torch.float64)
    Y = torch.randn(m, shape[1], generator=g, dtype=torch.float64)
    torch.testing.assert_close(P.apply(a * X + b * Y), a * P.apply(X) + b * P.apply(Y), rtol=1e-10, atol=1e-10)
