"""`distinf.attribute`: the whole method in one process, no Ray, for notebooks, small models, tests.

It runs the same core as the distributed job (index set, capture, Gram sums, Cholesky, chunk
scoring), so both give the same numbers for the same config. Every `compression.method` and
`hessian.method` runs here; pca adds a fit pass over the training set before the capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from distinf.config import AttributionConfig, CompressionConfig, HessianConfig, parse_config
from distinf.core.capture import GradientCapture, LossFn
from distinf.core.compressors import Compressor, NoneCompressor, build_compressor
from distinf.core.compressors.base import allocated_sizes
from distinf.core.compressors.none import check_fits
from distinf.core.compressors.pca import PCAFit
from distinf.core.curvature import block_slices
from distinf.core.curvatures import curvature_method, fit
from distinf.core.kfac import FactorSums
from distinf.core.scoring import (TopK, needs_self_influence, normalized, query_divisors, score_chunk,
                                   train_divisors)
from distinf.batching import collate
from distinf.core.solvers import Solver
from distinf.core.tasks import loss_function
from distinf.core.tracking import Tracked, track_modules
from distinf.optimizer_state import entry_scale
from distinf.tables import top_k_table, train_values_table


@dataclass
class AttributionResult:
    scores: np.ndarray          # float32 [n_queries, n_train], the ranking score: divided as scoring.normalize says
    influence: np.ndarray       # float32 [n_queries, n_train], ĝ_qᵀĤ⁻¹ĝ_i undivided: removing a set of
                                #   training rows changes a query's loss by about their sum / n_train
    self_influence: np.ndarray  # float32 [n_train] (NaN when scoring.self_influence is off)
    train_grads: np.ndarray     # float32 [n_train, k], columns in index-set order
    query_grads: np.ndarray     # float32 [n_queries, k]
    train_losses: np.ndarray
    query_losses: np.ndarray
    index_set: pa.Table         # param, flat_index (other methods than dropout: the component number)
    top_k: pa.Table             # query_id, rank, train_id, score, influence, kind (proponent / opponent)
    train_values: pa.Table      # train_id, loss, score_mean, self_influence, influence_mean
    damping: list[float]        # per curvature block
    tracked_fraction: float     # tracked parameter elements / all parameter elements


def batches(examples: Sequence[dict[str, Tensor]], batch_size: int, pad_token_id: int = 0) -> Iterator[dict[str, Tensor]]:
    """The examples in order, collated `batch_size` at a time."""
    for start in range(0, len(examples), batch_size):
        yield collate(list(examples[start : start + batch_size]), pad_token_id)


def compress_examples(capture: GradientCapture, examples: Sequence[dict[str, Tensor]], loss_fn: LossFn,
                      batch_size: int, device: torch.device, pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """Compressed gradients [n, k] and losses [n] of examples."""
    grads, losses = zip(*capture.run(batches(examples, batch_size, pad_token_id), loss_fn, device))
    return torch.cat(grads), torch.cat(losses)


def fit_pca(model: nn.Module, tracked: Tracked, comp: CompressionConfig, train: Sequence[dict[str, Tensor]],
            loss_fn: LossFn, batch_size: int, device: torch.device, pad_token_id: int = 0) -> Compressor:
    """The pca fit pass: every training example's whole gradient once, streamed into PCAFit."""
    names, shapes, sizes = allocated_sizes(tracked.param_shapes, comp.k, comp.seed, comp.allocation)
    fit = PCAFit(names, shapes, sizes, len(train), comp.seed)
    whole = NoneCompressor(list(zip(names, shapes)))
    columns = whole.layout.slices()
    with GradientCapture(model, tracked, whole) as capture:
        for grads, _ in capture.run(batches(train, batch_size, pad_token_id), loss_fn, device):
            fit.add({name: grads[:, part] for name, part in columns.items()})
    return fit.finish()


def solver_for(hessian: HessianConfig, slices: list[slice], train_grads: Tensor, train_ids: Sequence[str],
               factors: FactorSums | None = None) -> Solver:
    return fit(curvature_method(hessian), slices, train_grads, train_ids, factors)


def _ids(ids: Sequence[Any] | None, n: int, what: str) -> list[str]:
    if ids is None:
        return [str(i) for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{what}: {len(ids)} ids for {n} examples")
    if len(set(ids)) != n:
        raise ValueError(f"{what}: ids are not unique")
    return ids


def attribute(
    model: nn.Module,
    train: Sequence[dict[str, Tensor]],
    queries: Sequence[dict[str, Tensor]],
    task: str | Callable = "causal_lm",
    config: dict | AttributionConfig | None = None,
    train_ids: Sequence[Any] | None = None,
    query_ids: Sequence[Any] | None = None,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> AttributionResult:
    """Influence of every training example on every query, by compressed gradients (dropout by default)."""
    cfg = config if isinstance(config, AttributionConfig) else parse_config(config or {}, AttributionConfig)
    if not train or not queries:
        raise ValueError("attribute needs at least one training example and one query")
    train_ids, query_ids = _ids(train_ids, len(train), "train_ids"), _ids(query_ids, len(queries), "query_ids")
    loss_fn = loss_function(task)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()  # the model's own dropout off; per-example losses independent
    try:
        comp = cfg.compression
        tracked = track_modules(model, comp.modules.include, comp.modules.exclude)
        if comp.method == "pca":
            compressor = fit_pca(model, tracked, comp, train, loss_fn, batch_size, device, pad_token_id)
        else:
            compressor = build_compressor(tracked, comp.method, comp.k, comp.seed, comp.allocation)
        if comp.method == "none":
            sizes = [s.stop - s.start for s in block_slices(compressor.layout, cfg.hessian.blocks)]
            check_fits(sizes, len(train) + len(queries), cfg.hessian.method,
                       curvature_method(cfg.hessian).block_bytes(sizes))
        # kfac: the training batches also sum the Kronecker factors; the queries must not.
        factors = FactorSums(tracked, compressor.layout) if curvature_method(cfg.hessian).needs_factors else None
        scale = None if comp.optimizer_state is None else entry_scale(comp.optimizer_state, compressor.layout)
        with GradientCapture(model, tracked, compressor, factors=factors, column_scale=scale) as capture:
            train_grads, train_losses = compress_examples(capture, train, loss_fn, batch_size, device, pad_token_id)
            capture.factors = None
            query_grads, query_losses = compress_examples(capture, queries, loss_fn, batch_size, device, pad_token_id)
    finally:
        model.train(was_training)

    layout = compressor.layout
    solver = solver_for(cfg.hessian, block_slices(layout, cfg.hessian.blocks), train_grads, train_ids, factors)
    preconditioned = solver.precondition(query_grads).T  # [k, m]
    normalize = cfg.scoring.normalize
    self_inf = (solver.self_influence(train_grads).numpy()
                if cfg.scoring.self_influence or needs_self_influence(normalize) else None)
    influence = score_chunk(preconditioned, train_grads).numpy()
    scores = normalized(influence, query_divisors(normalize, query_grads, preconditioned),
                        train_divisors(normalize, train_grads, self_inf))
    top, bottom = TopK(len(queries), cfg.scoring.top_k), TopK(len(queries), cfg.scoring.top_k)
    top.update(scores, np.arange(len(train)), influence)
    bottom.update(-scores, np.arange(len(train)), influence)  # the K lowest scores: the strongest opponents
    if not cfg.scoring.self_influence:
        self_inf = None

    return AttributionResult(
        scores=scores.astype(np.float32),
        influence=influence.astype(np.float32),
        self_influence=(np.full(len(train), np.nan) if self_inf is None else self_inf).astype(np.float32),
        train_grads=train_grads.numpy(),
        query_grads=query_grads.numpy(),
        train_losses=train_losses.numpy(),
        query_losses=query_losses.numpy(),
        index_set=layout.to_table(),
        top_k=top_k_table(query_ids, train_ids, top.scores, top.positions, top.values,
                          -bottom.scores, bottom.positions, bottom.values),
        train_values=train_values_table(train_ids, train_losses.numpy(), scores.mean(0), self_inf,
                                        influence.mean(0)),
        damping=solver.damping,
        tracked_fraction=tracked.tracked_fraction,
    )
