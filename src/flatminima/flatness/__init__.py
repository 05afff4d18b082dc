"""flatminima.flatness: flatness measures of trained networks.

* :func:`local_energy`: training loss/error increase under random weight noise.
* :func:`local_free_entropy` / :func:`local_free_entropy_fn`: ``Phi(w; gamma, beta)`` by
  thermodynamic integration with Langevin (MALA/ULA) sampling.
* :func:`hvp`, :func:`hessian_eigenvalues`, :func:`hessian_trace`: Hessian spectrum measures.
* :func:`plot_local_energy`: local-energy curves as a PNG.

All measures leave the model (parameters, buffers, modes) and the global RNG unchanged.
"""

from flatminima.flatness.hessian import (
    HessianEigenResult,
    HessianOperator,
    HessianTraceResult,
    hessian_eigenvalues,
    hessian_trace,
    hvp,
)
from flatminima.flatness.local_energy import (
    LocalEnergyResult,
    evaluate_batches,
    local_energy,
    recalibrate_bn,
)
from flatminima.flatness.local_entropy import (
    LocalFreeEntropyResult,
    local_free_entropy,
    local_free_entropy_fn,
    quadratic_local_free_entropy,
    tilted_quadrature,
)
from flatminima.flatness.perturb import (
    ModelSnapshot,
    NoisePerturber,
    materialize_batches,
    preserve_state,
    select_parameters,
)
from flatminima.flatness.plots import plot_local_energy

__all__ = [
    "HessianEigenResult",
    "HessianOperator",
    "HessianTraceResult",
    "LocalEnergyResult",
    "LocalFreeEntropyResult",
    "ModelSnapshot",
    "NoisePerturber",
    "evaluate_batches",
    "hessian_eigenvalues",
    "hessian_trace",
    "hvp",
    "local_energy",
    "local_free_entropy",
    "local_free_entropy_fn",
    "materialize_batches",
    "plot_local_energy",
    "preserve_state",
    "quadratic_local_free_entropy",
    "recalibrate_bn",
    "select_parameters",
    "tilted_quadrature",
]
