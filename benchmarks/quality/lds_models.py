"""The models and the training recipe of benchmarks/quality/lds.py, in plain torch (no distinf).

The peer script (benchmarks/peers/lds_peer.py) runs in .venv-peers, which has no distinf, and
rebuilds the attributed model from these classes and an exported state dict; lds.py trains the
attributed model and every retrained one with the same `train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FashionCNN(nn.Module):
    """[N, 1, 28, 28] -> [N, 10]: two conv + ReLU + max-pool stages and a linear head; no BatchNorm
    (it couples the examples of a batch, and per-example influence assumes they are independent)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2)
        self.conv2 = nn.Conv2d(8, 16, 5, padding=2)
        self.head = nn.Linear(16 * 7 * 7, classes)

    def forward(self, inputs: Tensor) -> Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(inputs)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


class ReviewHead(nn.Module):
    """[N, d] frozen language-model features -> [N, classes]: the small trained part of the
    language setting, a two-layer tanh MLP over a review's mean-pooled hidden state."""

    def __init__(self, features: int = 576, hidden: int = 16, classes: int = 2):
        super().__init__()
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(inputs)))


class FashionMLP(nn.Module):
    """[N, 1, 28, 28] (or [N, 784]) pixels -> [N, classes]: an MLP of nn.Linear layers only
    (784→64→32→10, ReLU), the layer kind where Kronecker factors restricted to the kept entries
    are exact for one position per example."""

    def __init__(self, pixels: int = 784, hidden: tuple[int, ...] = (64, 32), classes: int = 10):
        super().__init__()
        sizes = [pixels, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(sizes[-1], classes)

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs.flatten(1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


MODELS = {"FashionCNN": FashionCNN, "ReviewHead": ReviewHead, "FashionMLP": FashionMLP}


@dataclass(frozen=True)
class Recipe:
    """Adam with the data order drawn from `seed` alone: the same arguments give the same model."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0


def build(name: str, kwargs: dict, state: dict[str, Tensor] | None = None) -> nn.Module:
    model = MODELS[name](**kwargs)
    if state is not None:
        model.load_state_dict(state)
    return model


def train(model: nn.Module, x: Tensor, y: Tensor, seed: int, recipe: Recipe,
          optimizer_out: list | None = None) -> nn.Module:
    """Trains `model` in place on (x, y) with `recipe`; returns it in eval mode. `optimizer_out`
    receives the final Adam state_dict (built from named_parameters, so it carries param_names)."""
    optimizer = torch.optim.Adam(model.named_parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe.epochs):
        for index in torch.randperm(len(x), generator=order).split(recipe.batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if optimizer_out is not None:
        optimizer_out.append(optimizer.state_dict())
    return model.eval()


def test_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy [N] of (x, y) under `model`."""
    with torch.no_grad():
        return torch.cat([F.cross_entropy(model(part), labels, reduction="none")
                          for part, labels in zip(x.split(1000), y.split(1000))])
