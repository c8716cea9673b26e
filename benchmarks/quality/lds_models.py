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


class LoraReviewClassifier(nn.Module):
    """[N, T] token ids (0 = padding) -> [N, classes]: a pretrained BERT encoder (all-MiniLM-L6-v2)
    with LoRA adapters (peft) on its attention query and value, mean-pooled, and a linear head.
    Only the adapters and the head train; dropout is off, so a retraining is a function of its
    data, seed and initial weights alone."""

    def __init__(self, model_dir: str, rank: int = 4, alpha: int = 8, classes: int = 2):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        # Eager attention: torch.func.vmap (TRAK's per-example gradients) has no batching rule for CPU SDPA.
        encoder = AutoModel.from_pretrained(model_dir, config=config, attn_implementation="eager")
        self.encoder = get_peft_model(encoder, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                          target_modules=["query", "value"]))
        self.head = nn.Linear(config.hidden_size, classes)

    def forward(self, inputs: Tensor) -> Tensor:
        keep = inputs != 0
        # An additive [N, 1, 1, T] mask, used as given: from a 0/1 mask, transformers' helper branches
        # on its values, which torch.func.vmap (TRAK's per-example gradients) cannot trace.
        additive = torch.zeros(keep.shape, dtype=torch.float32, device=inputs.device).masked_fill(~keep, -1e9)
        hidden = self.encoder(input_ids=inputs, attention_mask=additive[:, None, None, :]).last_hidden_state
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))


class TinyReviewTransformer(nn.Module):
    """[N, T] token ids (0 = padding) -> [N, classes]: a small pre-norm transformer encoder trained
    from scratch. Its token and position embeddings and its LayerNorms train with everything else,
    but only the nn.Linear layers are attributed (distinf `compression.modules`; kronfluence tracks
    only Linear layers anyway), so the attribution sees part of what training changed."""

    def __init__(self, vocab: int, positions: int, width: int = 32, layers: int = 2, heads: int = 2,
                 classes: int = 2):
        super().__init__()
        self.heads = heads
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(width), "query": nn.Linear(width, width), "key": nn.Linear(width, width),
            "value": nn.Linear(width, width), "out": nn.Linear(width, width), "norm2": nn.LayerNorm(width),
            "up": nn.Linear(width, 4 * width), "down": nn.Linear(4 * width, width)}) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: Tensor) -> Tensor:
        n, t = inputs.shape
        keep = inputs != 0
        x = self.tokens(inputs) + self.positions(torch.arange(t, device=inputs.device))
        masked = torch.zeros(n, 1, 1, t, dtype=x.dtype, device=x.device).masked_fill(~keep[:, None, None, :], -1e9)
        for block in self.blocks:
            h = block["norm1"](x)
            q, k, v = (block[name](h).view(n, t, self.heads, -1).transpose(1, 2) for name in ("query", "key", "value"))
            attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + masked, -1)
            x = x + block["out"]((attention @ v).transpose(1, 2).reshape(n, t, -1))
            x = x + block["down"](torch.relu(block["up"](block["norm2"](x))))
        weights = keep.unsqueeze(-1).to(x.dtype)
        return self.head((self.norm(x) * weights).sum(1) / weights.sum(1).clamp(min=1.0))


MODELS = {"FashionCNN": FashionCNN, "ReviewHead": ReviewHead, "FashionMLP": FashionMLP,
          "LoraReviewClassifier": LoraReviewClassifier, "TinyReviewTransformer": TinyReviewTransformer}


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
