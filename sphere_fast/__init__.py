"""sphere_fast: fast SPHERE sparse projection for sequential LLM editing.

Public API: :func:`sparse_projection` (drop-in for the reference; also as
:func:`project_B_into_soft_dirs`, the public SPHERE code's name),
:class:`SphereProjector` (fit once, apply many, warm refit),
:func:`hyperspherical_energy`, :func:`normalized_gram`, :func:`available_backends`.
Importing the package never compiles anything or touches a GPU.
"""
from ._checkout import import_hub_kernels_first

import_hub_kernels_first()  # before anything imports transformers (see _checkout)

from .backends import BackendUnavailableError, available_backends
from .eigensolver import ConvergenceError
from .ops import hyperspherical_energy, normalized_gram
from .projection import project_B_into_soft_dirs, sparse_projection
from .projector import SphereProjector

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ConvergenceError",
    "SphereProjector",
    "available_backends",
    "hyperspherical_energy",
    "normalized_gram",
    "project_B_into_soft_dirs",
    "sparse_projection",
    "__version__",
]
