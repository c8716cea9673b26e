"""Capture: hooks that turn one forward and one backward into [N, k] compressed gradients.

Life cycle: `GradientCapture(model, tracked, index_set)` plans the gather indices once; inside
`with capture:` each `capture.batch(batch, loss_fn)` runs forward, backward of the summed
per-example losses, and returns the kept entries of every example's gradient; `capture.run`
is the one batch loop over it (`distinf.attribute`, the pca fit and the gradient worker use it).
Forward hooks keep only the input columns the kept entries need; a hook on each module output
receives gy and adds the module's entries into the batch's [N, k] buffer (so tied weights sum
their uses).

`GradientCapture(model, tracked, compressor)` runs any compression of distinf.core.compressors
through the same hooks: the compressor says what a module keeps on forward and which [N, k_l]
columns it adds on backward. An IndexSet stands for the dropout compressor, the fast path.

With `factors=FactorSums(...)` (distinf.core.kfac) the same output-gradient hooks also sum the
Kronecker factors A_C and G_R of the kept entries; set `capture.factors = None` for batches that
must not shape the curvature (queries).

Weights are frozen for the duration: autograd then computes only activation gradients, the
floor of any gradient method, and never a p-sized weight gradient.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distinf.core.compressors import Compressor, DropoutCompressor
from distinf.core.index_set import IndexSet
from distinf.core.kfac import FactorSums
from distinf.core.tasks import move_batch
from distinf.core.tracking import ModuleUse, Tracked

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


class CaptureError(RuntimeError):
    pass


def refuse_coupling_layers(model: nn.Module) -> None:
    """A BatchNorm in train mode mixes examples of a batch: per-example gradients are undefined."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training:
            raise CaptureError(
                f"module {name!r} ({type(module).__name__}) is in train mode and couples the "
                "examples of a batch; call model.eval() (distinf.attribute does) before capture"
            )


class GradientCapture:
    def __init__(self, model: nn.Module, tracked: Tracked, compression: IndexSet | Compressor,
                 factors: FactorSums | None = None, column_scale: Tensor | None = None):
        """`column_scale` [k] multiplies every row's kept entries (optimizer-aware scores: 1/(√v + ε))."""
        self.model = model
        self.factors = factors
        self.column_scale = None if column_scale is None else column_scale.to(torch.float32)
        self.compressor = DropoutCompressor(compression) if isinstance(compression, IndexSet) else compression
        self.layout = self.compressor.layout
        columns = self.layout.slices()
        # Per hooked module: (use, plan, {local name: columns in the [N, k] buffer}).
        self._hooked: list[tuple[ModuleUse, Any, dict[str, slice]]] = []
        for use in tracked.uses:
            plan = self.compressor.plan(use)
            if plan is not None:
                self._hooked.append((use, plan, {local: columns[name] for local, name in use.params.items()
                                                 if name in columns}))
        self._handles: list[Any] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._buffer: Tensor | None = None
        self._batch_size = 0
        self._ran: set[str] = set()
        self._checked_first_batch = False

    def __enter__(self) -> "GradientCapture":
        self._frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for param, _ in self._frozen:
            param.requires_grad_(False)
        for use, plan, columns in self._hooked:
            self._handles.append(use.module.register_forward_pre_hook(self._per_example_inputs))
            self._handles.append(
                use.module.register_forward_hook(partial(self._on_forward, use, plan, columns))
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, requires_grad in self._frozen:
            param.requires_grad_(requires_grad)
        self._frozen.clear()

    def _per_example_inputs(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        # An input shared by the batch (position ids [1, T]) would sum its examples' gradients:
        # expand it so every example owns its rows.
        if x.dim() > 0 and x.shape[0] == 1 and self._batch_size > 1:
            x = x.expand(self._batch_size, *x.shape[1:])
        # With frozen weights nothing upstream of the first tracked layer needs grad; give such
        # an input a grad-requiring alias so gy reaches this layer.
        if x.is_floating_point() and not x.requires_grad:
            x = x.detach().requires_grad_(True)
        return None if x is args[0] else (x, *args[1:])

    def _on_forward(self, use: ModuleUse, plan: Any, columns: dict, module: nn.Module,
                    inputs: tuple, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise CaptureError(f"module {use.name!r} returned {type(output).__name__}, not a tensor")
        self._ran.add(use.name)
        kept = self.compressor.keep(use, plan, inputs)
        if not output.requires_grad:  # e.g. a frozen embedding's output, a leaf of the graph
            output.requires_grad_(True)
        output.register_hook(partial(self._on_grad, use, plan, columns, kept))

    def _on_grad(self, use: ModuleUse, plan: Any, columns: dict, kept: Any, grad: Tensor) -> None:
        entries = self.compressor.entries(use, plan, kept, grad)
        for local, values in entries.items():
            self._buffer[:, columns[local]] += values
        if self.factors is not None:
            self.factors.add(use, kept, grad)

    def batch(self, batch: dict[str, Tensor], loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        """One forward + backward: ([N, k] float32 kept gradient entries, [N] losses)."""
        if not self._handles:
            raise CaptureError("use GradientCapture inside a `with` block")
        refuse_coupling_layers(self.model)
        self._ran.clear()
        self._batch_size = len(next(iter(batch.values())))
        losses = loss_fn(self.model, batch)
        if losses.dim() != 1:
            raise CaptureError(f"the loss function must return per-example losses [N], got {tuple(losses.shape)}")
        if not losses.requires_grad:
            raise CaptureError("the loss does not depend on any tracked module")
        self._buffer = torch.zeros(len(losses), self.layout.k, dtype=torch.float32, device=losses.device)
        losses.sum().backward()
        if self.factors is not None:
            self.factors.add_examples(len(losses))
        grads, self._buffer = self._buffer, None
        self._warn_unused_modules()
        return grads, losses.detach().float()

    def run(self, batches: Iterable[dict[str, Tensor]], loss_fn: LossFn,
            device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """Per collated batch: ([N, k] kept gradient entries, [N] losses), on the CPU.

        Lazy, so a caller may stream the rows away (the pca fit, the worker's chunks) or free
        memory between steps instead of holding every batch's result.
        """
        for batch in batches:
            grads, losses = self.batch(move_batch(batch, device), loss_fn)
            grads, losses = grads.cpu(), losses.cpu()  # holds no device buffer into the next step
            if self.column_scale is not None:
                grads = grads * self.column_scale
            yield grads, losses

    def _warn_unused_modules(self) -> None:
        if self._checked_first_batch:
            return
        self._checked_first_batch = True
        silent = [use.name for use, _, _ in self._hooked if use.name not in self._ran]
        if silent:
            warnings.warn(
                f"tracked modules never ran their forward, so their entries are zero: {silent[:8]}"
                " (a layer whose weight is used without calling the module cannot be captured)",
                stacklevel=3,
            )

