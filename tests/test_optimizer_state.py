"""Optimizer-aware scores (compression.optimizer_state) against a dense computation: full
per-example gradients from torch.func, each entry divided by √v + ε of a real Adam state."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, grad

import distinf
from distinf.config import AttributionConfig, parse_config


def trained_mlp_and_adam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    optimizer = torch.optim.Adam(model.named_parameters(), lr=0.01)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), optimizer


def task(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def rows(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(6, generator=g), "y": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


TRAIN, QUERIES = rows(1, 12), rows(2, 4)


def dense_scores(model, optimizer, eps, damping):
    """Q' (G'ᵀG'/n + λI)⁻¹ G'ᵀ with G' = G / (√v + ε), every entry of every parameter."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    names = state["param_groups"][0]["param_names"]
    v = {name: state["state"][i]["exp_avg_sq"] for i, name in enumerate(names)}
    scale = torch.cat([1 / (v[n].reshape(-1).double().sqrt() + eps) for n in params])

    def flat(example):
        def loss(p):
            return F.cross_entropy(functional_call(model, p, (example["x"][None],)), example["y"][None])
        g = grad(loss)(params)
        return torch.cat([g[n].reshape(-1) for n in params]).double() * scale

    G, Q = torch.stack([flat(e) for e in TRAIN]), torch.stack([flat(e) for e in QUERIES])
    H = G.T @ G / len(G) + damping * torch.eye(G.shape[1], dtype=torch.float64)
    return (Q @ torch.linalg.solve(H, G.T)).numpy(), scale


def config(path, k=10**9):
    return {"compression": {"k": k, "optimizer_state": {"path": str(path), "eps": 1e-8}},
            "hessian": {"blocks": "full", "damping": 1e-3}, "scoring": {"normalize": "none"}}


def test_scores_with_a_saved_adam_state_equal_the_dense_scaled_solve(tmp_path):
    model, optimizer = trained_mlp_and_adam()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    expected, _ = dense_scores(model, optimizer, 1e-8, 1e-3)
    result = distinf.attribute(model, TRAIN, QUERIES, task=task, config=config(tmp_path / "optimizer.pt"))
    np.testing.assert_allclose(result.influence, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    plain = distinf.attribute(model, TRAIN, QUERIES, task=task, config={
        "hessian": {"blocks": "full", "damping": 1e-3}, "scoring": {"normalize": "none"}})
    assert not np.allclose(plain.influence, expected, rtol=1e-2)  # the scaling changes the answer


def test_sharded_safetensors_state_gives_the_same_kept_entries_as_the_torch_state(tmp_path):
    model, optimizer = trained_mlp_and_adam()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    state = optimizer.state_dict()
    v = {name: state["state"][i]["exp_avg_sq"] for i, name in enumerate(state["param_groups"][0]["param_names"])}
    (tmp_path / "shards").mkdir()
    names = list(v)
    save_file({n: v[n] for n in names[:2]}, str(tmp_path / "shards" / "part-0.safetensors"))
    save_file({n: v[n] for n in names[2:]}, str(tmp_path / "shards" / "part-1.safetensors"))
    _, scale = dense_scores(model, optimizer, 1e-8, 1e-3)
    by_torch = distinf.attribute(model, TRAIN, QUERIES, task=task, config=config(tmp_path / "optimizer.pt", k=20))
    by_shards = distinf.attribute(model, TRAIN, QUERIES, task=task, config=config(tmp_path / "shards", k=20))
    np.testing.assert_array_equal(by_shards.train_grads, by_torch.train_grads)
    # The kept columns are the plain gradient's kept columns times 1/(√v + ε) at their entries.
    plain = distinf.attribute(model, TRAIN, QUERIES, task=task, config={"compression": {"k": 20}})
    offsets = dict(zip(names, np.cumsum([0] + [v[n].numel() for n in names])[:-1]))
    index = by_torch.index_set.to_pydict()
    kept = [offsets[p] + f for p, f in zip(index["param"], index["flat_index"])]
    np.testing.assert_allclose(by_torch.train_grads, plain.train_grads * scale.numpy()[kept], rtol=1e-5)


def test_a_state_without_a_kept_parameter_is_refused_naming_it(tmp_path):
    model, optimizer = trained_mlp_and_adam()
    state = optimizer.state_dict()
    v = {name: state["state"][i]["exp_avg_sq"] for i, name in enumerate(state["param_groups"][0]["param_names"])}
    save_file({n: t for n, t in v.items() if n != "2.bias"}, str(tmp_path / "v.safetensors"))
    with pytest.raises(ValueError, match="no exp_avg_sq for '2.bias'"):
        distinf.attribute(model, TRAIN, QUERIES, task=task, config=config(tmp_path / "v.safetensors"))
    unnamed = torch.optim.Adam(model.parameters())
    torch.save(unnamed.state_dict(), tmp_path / "unnamed.pt")
    with pytest.raises(ValueError, match="param_names"):
        distinf.attribute(model, TRAIN, QUERIES, task=task, config=config(tmp_path / "unnamed.pt"))


def test_optimizer_state_is_refused_with_kronecker_curvature_and_projections():
    with pytest.raises(Exception, match="does not combine with hessian.method: kfac"):
        parse_config({"compression": {"optimizer_state": {"path": "x.pt"}}, "hessian": {"method": "kfac"}},
                     AttributionConfig)
    with pytest.raises(Exception, match="needs method: dropout"):
        parse_config({"compression": {"method": "gaussian", "optimizer_state": {"path": "x.pt"}}}, AttributionConfig)
