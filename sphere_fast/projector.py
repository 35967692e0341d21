"""SphereProjector: fit the principal hyperspherical directions once, apply many times.

For a weight W (n x d) with unit-normalised rows A_hat, U holds the top-r
eigenvectors of C = A_hat^T A_hat / n and the projector is P = I - alpha U U^T.
The eigenproblem is solved on the smaller Gram side (docs/design.md, "The math"):
when n <= d, an eigenpair (lambda, v) of A_hat A_hat^T / n lifts to the
eigenvector u = A_hat^T v / sqrt(n lambda) of C. P is never formed unless
:meth:`projection_matrix` is called.
"""
from __future__ import annotations

import torch

from . import _validation as val
from .backends import implementation
from .eigensolver import METHODS, Eigenpairs, orthonormalize
from .gram import NormalizedGram, ieee_fp32_matmul, work_dtype


def _gram(W: torch.Tensor, *, backend: str, precision: str) -> NormalizedGram:
    """:func:`sphere_fast.normalized_gram` for a W its caller has checked: its values are scanned once, there."""
    val.check_precision(precision)
    return implementation("gram", backend, W.device)(W, precision=precision)


def _solve(gram: NormalizedGram, eta: float, *, backend: str, method: str, init: torch.Tensor | None) -> Eigenpairs:
    top_eigenpairs = implementation("eigensolver", backend, gram.gram.device)
    return top_eigenpairs(gram.gram, gram.trace, eta, method=method, init=init)


# Bytes of the widened block of W that the lift multiplies at a time.
LIFT_BLOCK_BYTES = 64 * 2**20


# A caller's TF32 setting (unit roundoff 2^-11, about 4.9e-4, per product) would break the 1e-5 contract.
@ieee_fp32_matmul()
def _lift(W: torch.Tensor, gram: NormalizedGram, pairs: Eigenpairs) -> torch.Tensor:
    """Eigenvectors of C (d x r) from those of the Gram on the smaller side."""
    if gram.side == "cols":
        return pairs.vectors
    dtype = pairs.vectors.dtype
    scaled = pairs.vectors * gram.row_scale.to(dtype).unsqueeze(1)  # D V
    # (V^T D W)^T, the faster orientation for CPU BLAS. A 16-bit W is widened a block of columns at a
    # time: a whole fp32 copy would be twice the size of W.
    n, d = W.shape
    columns = d if W.dtype == dtype else max(1, LIFT_BLOCK_BYTES // (n * dtype.itemsize))
    if columns >= d:
        U = (scaled.T @ W.to(dtype)).T
    else:
        Ut = torch.empty(scaled.shape[1], d, dtype=dtype, device=W.device)
        for start in range(0, d, columns):
            Ut[:, start:start + columns] = scaled.T @ W[:, start:start + columns].to(dtype)
        U = Ut.T
    U /= torch.sqrt(gram.n * pairs.values.clamp_min(torch.finfo(torch.float64).tiny)).to(dtype)
    # The lift is orthonormal in exact arithmetic, so one CholeskyQR pass (float64
    # block Gram) removes its rounding; a second would change nothing.
    return orthonormalize(U, passes=1)


class SphereProjector:
    """Projector ``P = I - alpha U U^T`` onto the sparse space of a weight matrix.

    Build with :meth:`fit`. Attributes: ``U`` (d x r, orthonormal columns, by
    descending eigenvalue), ``eigenvalues`` (descending, float64), ``rank``,
    ``trace``, ``eta``, ``alpha``, ``method`` (the eigensolver path taken).
    """

    def __init__(self, U, eigenvalues, *, trace, eta, alpha, side, basis, backend, method, shape, precision="fp32"):
        self.U = U
        self.eigenvalues = eigenvalues
        self.trace = trace
        self.eta = eta
        self.alpha = alpha
        self.method = method
        self.backend = backend
        self.shape = shape
        self.precision = precision  # the Gram's input precision, kept by refit
        self._side = side
        self._basis = basis  # eigenvectors on the Gram side: the warm start for refit

    # -- fitting -----------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        W: torch.Tensor,
        eta: float = 0.5,
        alpha: float = 0.5,
        *,
        backend: str = "auto",
        method: str = "auto",
        precision: str = "fp32",
    ) -> "SphereProjector":
        """Fit on the current weight W (n x d; fp16, bf16, fp32 or fp64).

        Parameters
        ----------
        eta : cumulative energy ratio in (0, 1]; r is the smallest count of
            leading eigenvalues whose sum passes ``eta * trace``.
        alpha : suppression strength in [0, 1].
        backend : "auto", "cuda", "triton" or "torch" (:mod:`sphere_fast.backends`).
        method : eigensolver, "auto", "dense" or "block".
        precision : input precision of the Gram products (``sphere_fast.gram.PRECISIONS``).
        """
        val.check_matrix(W, "W", finite=False)
        eta = val.check_eta(eta)
        alpha = val.check_alpha(alpha)
        val.check_choice(method, "method", METHODS)  # before the Gram is computed, not after
        val.check_precision(precision)
        val.check_finite(W, "W")
        return cls._fit(W, eta, alpha, backend=backend, method=method, precision=precision, init=None)

    @classmethod
    def _fit(cls, W, eta, alpha, *, backend, method, precision, init):
        """fit for a W, eta and alpha its caller has checked."""
        gram = _gram(W, backend=backend, precision=precision)
        if gram.trace == 0.0:
            raise ValueError("W has only zero rows: it has no principal directions to project out")
        pairs = _solve(gram, eta, backend=backend, method=method, init=init)
        U = _lift(W, gram, pairs)
        return cls(
            U,
            pairs.values,
            trace=gram.trace,
            eta=eta,
            alpha=alpha,
            side=gram.side,
            basis=pairs.vectors,
            backend=backend,
            method=pairs.method,
            shape=tuple(W.shape),
            precision=precision,
        )

    def refit(self, W_new: torch.Tensor, *, method: str = "auto") -> "SphereProjector":
        """Recompute for a changed weight of the same shape, warm-started from the current basis.

        The result meets the same accuracy contract as a cold :meth:`fit` with the
        same ``precision``; the warm start only makes it faster. Updates this
        projector and returns it.
        """
        val.check_matrix(W_new, "W_new", finite=False)
        val.check_shape(W_new, "W_new", self.shape, "the fitted shape")
        val.check_choice(method, "method", METHODS)
        val.check_finite(W_new, "W_new")
        init = self._basis.to(device=W_new.device, dtype=work_dtype(W_new.dtype))
        fresh = self._fit(
            W_new, self.eta, self.alpha, backend=self.backend, method=method, precision=self.precision, init=init
        )
        self.__dict__.update(fresh.__dict__)
        return self

    # -- saving -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors (on CPU) and plain values that :meth:`from_state_dict` restores, warm start included."""
        return {
            "U": self.U.detach().cpu().clone(), "eigenvalues": self.eigenvalues.detach().cpu().clone(),
            "basis": self._basis.detach().cpu().clone(), "trace": float(self.trace), "eta": self.eta,
            "alpha": self.alpha, "side": self._side, "backend": self.backend, "method": self.method,
            "shape": list(self.shape), "precision": self.precision,
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None) -> "SphereProjector":
        """A projector from :meth:`state_dict`, its tensors on ``device`` (default: as saved).

        The fields are checked against each other first (ValueError / TypeError naming the field). States saved
        before ``precision`` was recorded were fitted in fp32.
        """
        val.check_projector_state(state)
        return cls(
            state["U"].to(device).clone(), state["eigenvalues"].clone(), trace=state["trace"], eta=state["eta"],
            alpha=state["alpha"], side=state["side"], basis=state["basis"].to(device).clone(),
            backend=state["backend"], method=state["method"], shape=tuple(state["shape"]),
            precision=state.get("precision", "fp32"),
        )

    # -- properties ---------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def d(self) -> int:
        return self.U.shape[0]

    def __repr__(self) -> str:
        return (
            f"SphereProjector(d={self.d}, rank={self.rank}, eta={self.eta}, alpha={self.alpha}, "
            f"captured={float(self.eigenvalues.sum()) / self.trace:.4f}, method={self.method!r})"
        )

    # -- application --------------------------------------------------------------
    def _check_update(self, B: torch.Tensor, name: str, *, finite: bool = True) -> None:
        val.check_matrix(B, name, finite=False)
        val.check_same_device(**{name: B, "U": self.U})
        val.check_columns(B, self.d, name, "the fitted weight")
        if finite:
            val.check_finite(B, name)

    def apply(self, B: torch.Tensor) -> torch.Tensor:
        """``B - alpha (B U) U^T`` in B's dtype (fp32 accumulation), any number of rows."""
        self._check_update(B, "B")
        return self._apply(B)

    def _apply(self, B: torch.Tensor) -> torch.Tensor:
        """apply for a B the caller has checked."""
        return implementation("apply", self.backend, B.device)(B, self.U, self.alpha)

    def apply_(self, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``W += B - alpha (B U) U^T`` in place, in W's dtype with fp32 accumulation; returns W.

        All checks run before W is touched: on error W is unchanged.
        """
        val.check_matrix(W, "W", finite=False)
        self._check_update(B, "B", finite=False)
        val.check_same_shape(W=W, B=B)
        val.check_same_device(W=W, B=B)
        val.check_writable(W, "W")
        val.check_finite(B, "B")
        with torch.no_grad():
            return implementation("apply_", self.backend, W.device)(W, B, self.U, self.alpha)

    @ieee_fp32_matmul()
    def projection_matrix(self) -> torch.Tensor:
        """The dense d x d ``P = I - alpha U U^T`` (only when asked for)."""
        eye = torch.eye(self.d, dtype=self.U.dtype, device=self.U.device)
        return torch.addmm(eye, self.U, self.U.T, alpha=-self.alpha)


# -- the torch backend of apply / apply_ (twins of sphere_fast._cuda.project / project_add_) --


@ieee_fp32_matmul()
def project_work(B: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """``B - alpha (B U) U^T`` in B's working precision (:func:`~sphere_fast.gram.work_dtype`: fp64 for
    fp64 B, else fp32), as the CUDA backend computes it, whatever U's dtype."""
    dtype = work_dtype(B.dtype)
    Bw, Uw = B.to(dtype), U.to(dtype)
    return torch.addmm(Bw, Bw @ Uw, Uw.T, alpha=-alpha)


def project(B: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """``B - alpha (B U) U^T`` in B's dtype, computed in its working precision."""
    return project_work(B, U, alpha).to(B.dtype)


def project_add_(W: torch.Tensor, B: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W += B - alpha (B U) U^T`` in place, rounded to W's dtype once; returns W."""
    update = project_work(B, U, alpha)
    if W.dtype == update.dtype:
        W.add_(update)
    elif W.element_size() > update.element_size():
        W.add_(update.to(W.dtype))  # an fp64 W keeps its low bits
    else:
        W.copy_(update.add_(W.to(update.dtype)))  # 16-bit W: add in fp32, round once
    return W
