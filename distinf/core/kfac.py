"""Kronecker factors restricted to the index set: a curvature of the kept entries, K_S = (A ⊗ G)[S, S].

For a tensor that acts as a linear map (weight W[out, in], a bias being one more input column of
ones), K-FAC approximates the curvature of its gradient by A ⊗ G: A the second moment of the layer
inputs x, G that of the output gradients gy. Restricted to the kept entries i = (r_i, c_i),

    K_S[i, j] = A[c_i, c_j] · G[r_i, r_j],

so only A_C over the kept input columns C and G_R over the kept output rows R are ever formed,
from the x[:, C] the forward hook already keeps and the gy the output-gradient hook sees:
O(N·T·k) work and O(k²) memory per tensor, never in × in or out × out.

Normalisation ("expand", per token): with n examples and m active positions of the layer,

    A = (1/m) Σ_{n,t} x_nt x_ntᵀ,      G = (1/n) Σ_{n,t} gy_nt gy_ntᵀ,

so K is on the scale of the Gram (1/n) Σ_n g_n g_nᵀ, g_n = Σ_t gy_nt ⊗ x_nt: it is the Gram's
same-token terms with inputs and output gradients taken as independent, and it converges to the
Gram when the tokens are independent and zero-mean. For one position (T = 1) it is K-FAC of the
Gram exactly. That scale makes the mixture (1 − β)·K_S + β·Gram_S meaningful. A position is
active when its output gradient is not all zero (padding, a masked prompt token, the last
position of a causal LM): such a position adds nothing to any gradient, so it is not a token of
A, and the factors do not depend on how examples are batched or padded.

Which tensor gets which:
- nn.Linear (also PEFT LoRA's lora_A / lora_B), HF Conv1D, nn.Conv2d (unfolded patches; grouped
  convolutions too, a weight entry's column being its group's unfolded column): A_C ⊗ G_R.
- their bias: the input is the constant 1, so A = 1 and K_S = G_R.
- nn.Embedding: the input is a one-hot token, so A is diagonal, the kept tokens' frequencies among
  the active non-padding positions; G over the kept embedding dimensions.
- a tied tensor (used by more than one module, e.g. input embedding = output layer), whose
  gradient is a sum over unlike uses, and any layer kind without a factored form: the empirical
  Gram block of its kept entries (`FactorSums.gram_fallback` names them). A module called more
  than once per forward (one tensor, like uses) adds each call's positions as further tokens.
K_S is block-diagonal across tensors.

Eigenvalue correction (hessian.method ekfac), EK-FAC's idea in the index space: K_S = U Λ Uᵀ
gives the basis, and each eigenvalue is replaced by the Gram's variance along its eigenvector,

    E_S = U diag(uᵢᵀ Gram_S uᵢ) Uᵀ,

the Gram's best diagonal approximation in K_S's eigenbasis. It is well defined for any S (EK-FAC's
own correction needs the full gradient in A ⊗ G's eigenbasis, which dropout never forms); it costs
an eigendecomposition per tensor block, the order of its Cholesky. Gram-fallback tensors keep
their Gram block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distinf.core.adapters.base import LinearLayoutAdapter, gather_last, plan_weight
from distinf.core.adapters.embedding import EmbeddingAdapter
from distinf.core.curvature import GramSums
from distinf.core.index_set import IndexSet
from distinf.core.tracking import ModuleUse, Tracked

@dataclass
class TensorFactors:
    """The additive factor sums of one tracked tensor and where each kept entry sits in them.

    input_sum: Σ x_C x_Cᵀ over active positions, [|C|, |C|] ([|C|]: the diagonal, for an
    embedding's token counts; [1, 1]: a bias's column of ones). output_sum: Σ gy_R gy_Rᵀ, [|R|, |R|].
    """

    input_sum: Tensor
    output_sum: Tensor
    input_of_entry: Tensor  # [k_l]: position of c_i in C
    output_of_entry: Tensor  # [k_l]: position of r_i in R
    output_index: Tensor  # R: the kept output rows (an embedding's: kept dimensions), ascending
    input_index: Tensor | None = None  # an embedding's C: the kept token ids, ascending
    tokens: float = 0.0  # active positions seen

    def merge(self, other: "TensorFactors") -> None:
        self.input_sum += other.input_sum
        self.output_sum += other.output_sum
        self.tokens += other.tokens

    def block_sum(self, count: int) -> Tensor:
        """count · K_S, [k_l, k_l] float64: on the scale of a Gram sum Σ ĝĝᵀ."""
        if self.tokens == 0:
            return torch.zeros(len(self.input_of_entry), len(self.input_of_entry), dtype=torch.float64)
        a, g = self.input_sum / self.tokens, self.output_sum
        ci, ri = self.input_of_entry, self.output_of_entry
        if a.dim() == 1:  # one-hot inputs: A[c_i, c_j] is zero unless the tokens agree
            a_entries = torch.where(ci[:, None] == ci[None, :], a[ci][:, None], 0.0)
        else:
            a_entries = a[ci][:, ci]
        return a_entries * g[ri][:, ri]


def _zeros(*shape: int) -> Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


def _long(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def _factors_of(use: ModuleUse, local: str, flat: np.ndarray) -> TensorFactors | None:
    """Empty factor sums for one tensor of a module, or None if its kind has no factored form."""
    module, adapter = use.module, use.adapter
    if isinstance(adapter, LinearLayoutAdapter) and local == "weight":
        plan = plan_weight(*adapter.weight_rows_cols(module, flat))  # the very C and R the capture keeps
        rows, cols = len(plan.unique_rows), len(plan.unique_cols)
        return TensorFactors(_zeros(cols, cols), _zeros(rows, rows), plan.col_of_entry, plan.row_of_entry,
                             plan.unique_rows)
    if isinstance(adapter, LinearLayoutAdapter) and local == "bias":
        rows, row_of_entry = np.unique(flat, return_inverse=True)
        return TensorFactors(_zeros(1, 1), _zeros(len(rows), len(rows)), torch.zeros(len(flat), dtype=torch.long),
                             _long(row_of_entry), _long(rows))
    if isinstance(adapter, EmbeddingAdapter) and local == "weight":
        tokens, dims = np.divmod(flat, module.embedding_dim)
        unique_tokens, token_of_entry = np.unique(tokens, return_inverse=True)
        unique_dims, dim_of_entry = np.unique(dims, return_inverse=True)
        return TensorFactors(_zeros(len(unique_tokens)), _zeros(len(unique_dims), len(unique_dims)),
                             _long(token_of_entry), _long(dim_of_entry), _long(unique_dims), _long(unique_tokens))
    return None


class FactorSums:
    """A_C and G_R of every factored tensor of the index set, summed over training batches.

    Life cycle: `FactorSums(tracked, index_set)`; pass it to `GradientCapture(..., factors=...)`,
    which calls `add` on each tracked module's output gradient and `add_examples` per batch, for
    the training examples only; `merge` sums another's (another chunk or worker); `curvature_sums`
    turns the total into Gram-scaled blocks for distinf.core.curvature.factorize_.
    """

    def __init__(self, tracked: Tracked, index_set: IndexSet):
        if not isinstance(index_set, IndexSet):
            raise ValueError("hessian.method: kfac and kfac_mix need compression.method: dropout (the Kronecker "
                             f"factors are of kept gradient entries); got {getattr(index_set, 'method', index_set)!r}")
        self.index_set = index_set
        flat = dict(zip(index_set.names, index_set.flat_indices))
        uses_of: dict[str, list[tuple[ModuleUse, str]]] = {}
        for use in tracked.uses:
            for local, name in use.params.items():
                if name in flat:
                    uses_of.setdefault(name, []).append((use, local))
        self.tensors: dict[str, TensorFactors] = {}
        self._modules: dict[str, dict[str, str]] = {}  # module name -> {local: canonical} of factored tensors
        for name, uses in uses_of.items():
            factors = _factors_of(*uses[0], flat[name]) if len(uses) == 1 else None
            if factors is not None:
                self.tensors[name] = factors
                self._modules.setdefault(uses[0][0].name, {})[uses[0][1]] = name
        self.gram_fallback = [name for name in index_set.names if name not in self.tensors]
        self.count = 0

    def add_examples(self, n: int) -> None:
        self.count += n

    def add(self, use: ModuleUse, kept: Any, grad_output: Tensor, rows: Tensor | None = None) -> None:
        """One module's batch: `kept` is what the dropout adapter kept on forward (x[N, T, |C|], or
        token ids [N, T] for an embedding), grad_output the module's output gradient. `rows`, a
        bool mask [N], keeps only those examples' positions (a batch's padding slots or rows left
        out run through the model too); None: every example."""
        wanted = self._modules.get(use.name)
        if not wanted:
            return
        if isinstance(use.adapter, EmbeddingAdapter):
            self._add_embedding(use, wanted["weight"], kept, grad_output, rows)
            return
        gy = use.adapter.output_grads(use.module, grad_output).float()  # [N, T, out]
        active = gy.any(-1)  # [N, T]: a position whose output gradient is not all zero
        if rows is not None:
            active &= rows.to(active.device)[:, None]
        tokens = float(active.sum())
        for local, name in wanted.items():
            factors = self.tensors[name]
            g = gather_last(gy, factors.output_index.to(gy.device)).flatten(0, 1)
            if rows is not None:
                g = g[active.flatten()]
            factors.output_sum += (g.T @ g).double().cpu()
            factors.tokens += tokens
            if local == "weight":
                x = kept.float().flatten(0, 1)[active.flatten()]
                factors.input_sum += (x.T @ x).double().cpu()
            else:
                factors.input_sum += tokens

    def _add_embedding(self, use: ModuleUse, name: str, ids: Tensor, grad_output: Tensor,
                       rows: Tensor | None) -> None:
        module, factors = use.module, self.tensors[name]
        gy = grad_output.reshape(ids.shape[0], ids.shape[1], -1).float()
        active = gy.any(-1)
        if rows is not None:
            active &= rows.to(active.device)[:, None]
        if module.padding_idx is not None:  # the padding row gets no gradient: not a token of A
            active &= ids != module.padding_idx
        live_ids = ids[active].long()
        kept_tokens = factors.input_index.to(ids.device)
        # Each position's kept token, if any: a sorted search, O(m·log |C|), no [m, |C|] temporary.
        where = torch.searchsorted(kept_tokens, live_ids).clamp(max=len(kept_tokens) - 1)
        hit = kept_tokens[where] == live_ids
        counts = torch.bincount(where[hit], minlength=len(kept_tokens))
        g = gy[active][:, factors.output_index.to(gy.device)]
        factors.input_sum += counts.double().cpu()
        factors.output_sum += (g.T @ g).double().cpu()
        factors.tokens += float(active.sum())

    def merge(self, other: "FactorSums") -> "FactorSums":
        for name, factors in self.tensors.items():
            factors.merge(other.tensors[name])
        self.count += other.count
        return self

    def curvature_sums(self, gram: GramSums, mix: float = 0.0, eigen_corrected: bool = False) -> GramSums:
        """Blocks (1 − mix)·n·K_S + mix·Σ ĝĝᵀ on the slices of `gram` (the Gram sums of the same
        training examples): factorize_ of them is the damped Cholesky of (1 − mix)·K_S + mix·Gram_S.
        With `eigen_corrected` (ekfac) each tensor's K_S is replaced by E_S, its eigenbasis with the
        Gram's variances as eigenvalues (module docstring). A tensor in gram_fallback takes its Gram
        block whatever the mix; across tensors K_S is zero."""
        if gram.count != self.count:
            raise ValueError(f"Kronecker factors of {self.count} examples, Gram sums of {gram.count}: "
                             "both must come from the same training examples")
        columns = self.index_set.slices()
        blocks = []
        for block, part in zip(gram.blocks, gram.slices):
            out = block * mix if mix else torch.zeros_like(block)
            for name, cols in columns.items():
                if cols.start < part.start or cols.stop > part.stop:
                    continue
                local = slice(cols.start - part.start, cols.stop - part.start)
                if name in self.tensors:
                    kron = self.tensors[name].block_sum(self.count)
                    if eigen_corrected:
                        kron = eigen_corrected_block(kron, block[local, local])
                    out[local, local] += (1.0 - mix) * kron
                else:
                    out[local, local] += (1.0 - mix) * block[local, local]
            blocks.append(out)
        return GramSums(gram.slices, blocks, gram.count)


def eigen_corrected_block(kron: Tensor, gram: Tensor) -> Tensor:
    """U diag(uᵢᵀ gram uᵢ) Uᵀ for kron = U Λ Uᵀ (symmetric, float64): `gram`'s variances along
    `kron`'s eigenvectors. Sums in, sums out: both are over the same n examples."""
    _, basis = torch.linalg.eigh(kron)
    variances = ((gram @ basis) * basis).sum(0)
    return (basis * variances) @ basis.T
