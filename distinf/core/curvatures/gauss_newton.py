"""gauss_newton: Ĥ = (1/n) Σ ĝĝᵀ + λI per block, Cholesky (distinf.core.curvature). Exact in the compressed space."""

from __future__ import annotations

from distinf.core.curvatures.base import CholeskyMethod


class GaussNewton(CholeskyMethod):
    name = "gauss_newton"
    extends_stored_sums = True  # the Gram sums are additive: an append adds only its new chunks
