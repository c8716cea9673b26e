"""kfac, kfac_mix and ekfac: Kronecker factors restricted to the kept entries (distinf.core.kfac),
made into sums on the Gram's scale and damped and factorised like gauss_newton's.

kfac: Ĥ = K_S + λI; kfac_mix: Ĥ = (1 − β)·K_S + β·(1/n) Σ ĝĝᵀ + λI (β = hessian.mix, 0.5 unset);
ekfac: K_S's eigenbasis with the Gram's variances along it as eigenvalues, + λI. Stored as
`curvature_sum.i` beside `cholesky.i`; an append sums every chunk's Gram and factor sums again.
"""

from __future__ import annotations

from functools import partial

from distinf.core.curvature import GramSums
from distinf.core.curvatures.base import CholeskyMethod, TrainChunks
from distinf.core.kfac import FactorSums


class KFAC(CholeskyMethod):
    name = "kfac"
    needs_factors = True
    sum_name = "curvature_sum"
    eigen_corrected = False

    @property
    def gram_share(self) -> float:
        """β, the Gram's share of the curvature."""
        return 0.0

    def sums(self, gram: GramSums, factors: FactorSums | None) -> GramSums:
        if factors is None:
            raise ValueError(f"hessian.method: {self.name} needs the Kronecker factors summed by the capture "
                             "(GradientCapture(..., factors=FactorSums(...)))")
        return factors.curvature_sums(gram, self.gram_share, eigen_corrected=self.eigen_corrected)

    def chunk_sums(self, slices: list[slice], train: TrainChunks) -> GramSums:
        factors = train.factor_sums()
        gram = train.sum(partial(GramSums, slices))
        if gram.count == 0:
            raise ValueError("no training examples: the curvature is undefined")
        return self.sums(gram, factors)


class KFACMix(KFAC):
    name = "kfac_mix"
    keys = ("mix",)

    @property
    def gram_share(self) -> float:
        return 0.5 if self.hessian.mix is None else self.hessian.mix


class EKFAC(KFAC):
    name = "ekfac"
    eigen_corrected = True
