"""benchmarks/quality/lds.py (the linear datamodeling score) at a tiny size.

What is checked against an independent computation: the Spearman correlation against the
textbook formula (no ties) and against ranks counted by brute force (ties); the whole LDS on ridge
regression, where leave-subset-out retraining is a dense solve and the exact influence (a dense
solve too) gives LDS near 1, its negation near −1 and random scores near 0; the benchmark's
distinf.attribute call (whole gradients, no curvature) against torch.func gradient dot products.
The image setting's whole command then runs end to end on synthetic Fashion-MNIST files, with an
export for the peer script and a peer's score file read back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.quality import lds
from test_retraining_smoke import fake_fashion_mnist


def brute_force_ranks(values: np.ndarray) -> np.ndarray:
    """Rank of each entry: how many are smaller, plus half of the others equal to it."""
    return np.array([(values < v).sum() + ((values == v).sum() - 1) / 2 for v in values])


def test_spearman_matches_the_textbook_formula_without_ties():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((40, 7)), rng.standard_normal((40, 7))
    b[:, 0] = a[:, 0] ** 3  # monotone: exactly 1
    n = len(a)
    ranks = lambda column: np.argsort(np.argsort(column))  # noqa: E731
    textbook = [1 - 6 * ((ranks(a[:, j]) - ranks(b[:, j])) ** 2).sum() / (n * (n * n - 1)) for j in range(7)]
    assert np.allclose(lds.spearman_columns(a, b), textbook)
    assert lds.spearman_columns(a, b)[0] == pytest.approx(1.0)


def test_spearman_with_ties_is_pearson_of_brute_force_average_ranks():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, (30, 5)).astype(float), rng.integers(0, 3, (30, 5)).astype(float)
    for j in range(5):
        assert np.allclose(lds.average_ranks(a[:, j]), brute_force_ranks(a[:, j]))
        expected = np.corrcoef(brute_force_ranks(a[:, j]), brute_force_ranks(b[:, j]))[0, 1]
        assert lds.spearman_columns(a, b)[j] == pytest.approx(expected)
    a[:, 2] = 1.0  # a constant column has no correlation
    assert np.isnan(lds.spearman_columns(a, b)[2])


def test_subset_masks_are_seeded_half_subsets():
    masks = lds.subset_masks(101, 20, 0.5, seed=3)
    assert masks.shape == (20, 101) and (masks.sum(1) == 50).all()
    assert np.array_equal(masks, lds.subset_masks(101, 20, 0.5, seed=3))
    assert len({row.tobytes() for row in masks}) == 20
    assert not np.array_equal(masks, lds.subset_masks(101, 20, 0.5, seed=4))


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(lam * np.eye(x.shape[1]) + x.T @ x, x.T @ y)


def test_exact_influence_on_ridge_regression_gives_lds_near_one_and_random_near_zero():
    """Ridge regression, loss (x·θ − y)²/2 per example plus λ/2‖θ‖²: retraining on a subset is
    a dense solve, and the exact influence ∇ℓ_q H⁻¹ ∇ℓ_i (H = λI + XᵀX) is linear in which
    examples are kept to first order, so with a λ that keeps the subsets' effects small it ranks
    the subsets almost perfectly."""
    rng = np.random.default_rng(0)
    n, d, q, m = 200, 5, 30, 60
    x, tx = rng.standard_normal((n, d)), rng.standard_normal((q, d))
    w = rng.standard_normal(d)
    y, ty = x @ w + rng.standard_normal(n), tx @ w + rng.standard_normal(q)
    lam = 5.0 * n
    theta = ridge(x, y, lam)
    h = lam * np.eye(d) + x.T @ x
    train_grads = x * (x @ theta - y)[:, None]
    test_grads = tx * (tx @ theta - ty)[:, None]
    exact = test_grads @ np.linalg.solve(h, train_grads.T)  # [q, n], positive = lowers the test loss
    masks = lds.subset_masks(n, m, 0.5, seed=0)
    losses = np.stack([0.5 * (tx @ ridge(x[s], y[s], lam) - ty) ** 2 for s in masks])
    good = lds.lds_per_query(exact, masks, losses)
    assert np.mean(good) > 0.9
    assert np.mean(lds.lds_per_query(-exact, masks, losses)) < -0.9
    noise = lds.lds_per_query(rng.standard_normal((q, n)), masks, losses)
    assert abs(np.mean(noise)) < 0.1


def test_lds_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        lds.lds_per_query(np.zeros((3, 10)), np.zeros((4, 10), bool), np.zeros((4, 2)))


def test_image_setting_runs_end_to_end_with_an_export_and_a_peer(tmp_path, capsys):
    data = fake_fashion_mnist(tmp_path / "fm", n_train=80, n_test=30)
    common = ["--setting", "image", "--data", str(data), "--n-train", "80", "--n-test", "20", "--subsets", "5",
              "--epochs", "2", "--batch-size", "16", "--ks", "64", "--work", str(tmp_path / "work")]
    out = tmp_path / "out.md"
    lds.main(common + ["--methods", "dropout:gauss_newton", "none:identity", "--export", str(tmp_path / "export"),
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert "retrained 5/5" in printed
    exported = torch.load(tmp_path / "export" / "image.pt")
    assert exported["masks"].shape == (5, 80) and exported["losses"].shape == (5, 20)
    assert exported["x"].shape == (80, 1, 28, 28) and exported["tx"].shape == (20, 1, 28, 28)

    # A peer whose scores are the retrained losses' own linear datamodel: LDS 1 by construction.
    masks, losses = exported["masks"].numpy().astype(float), exported["losses"].numpy()
    peer = -np.linalg.lstsq(masks, losses, rcond=None)[0].T  # [20, 80]: Σ over a subset predicts −loss
    np.save(tmp_path / "peer.npy", peer)
    lds.main(common + ["--methods", "dropout:identity", "--peer", f"linear fit={tmp_path / 'peer.npy'}",
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert "retrained 5/5" not in printed  # the cached losses were reused
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "method" not in line]
    names = [line.split("|")[1].strip() for line in rows]
    assert names == ["dropout, gauss_newton", "none, identity", "random scores (floor)",
                     "dropout, identity", "linear fit", "random scores (floor)"]
    for line in rows:
        value = float(line.split("|")[3].split("±")[0])
        assert -1 <= value <= 1
    assert float(rows[4].split("|")[3].split("±")[0]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_text_setting_runs_end_to_end_on_frozen_smollm2_features(tmp_path):
    out = tmp_path / "out.md"
    lds.main(["--setting", "text", "--n-train", "40", "--n-test", "8", "--subsets", "4", "--max-length", "24",
              "--ks", "128", "--methods", "dropout:gauss_newton", "--work", str(tmp_path), "--out", str(out)])
    features = list(tmp_path.glob("text-features-*.pt"))
    assert len(features) == 1 and torch.load(features[0]).shape == (48, 576)
    assert "| dropout, gauss_newton | 128 |" in out.read_text()


def test_attribution_with_whole_gradients_and_no_curvature_is_the_dot_product_of_torch_func_gradients():
    """none:identity scores are g_q · g_i of the per-example cross-entropy gradients, computed here
    with torch.func over all parameters: the benchmark's task, examples and sign as distinf gets them."""
    from torch.func import functional_call, grad, vmap

    from benchmarks.quality.lds_models import Recipe, ReviewHead

    torch.manual_seed(0)
    x, tx = torch.randn(12, 6), torch.randn(4, 6)
    y, ty = torch.randint(0, 2, (12,)), torch.randint(0, 2, (4,))
    setting = lds.Setting("toy", "ReviewHead", {"features": 6, "hidden": 3}, Recipe(1, 4, 1e-2), x, y, tx, ty, "")
    model = ReviewHead(features=6, hidden=3)
    scores, _ = lds.attribution(model, setting, "none", "identity", 1, 0)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, inputs, label):
        logits = functional_call(model, p, (inputs.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(logits, label.unsqueeze(0))

    def flat(inputs, labels):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
        return torch.cat([grads[name].flatten(1) for name in params], 1)

    expected = flat(tx, ty) @ flat(x, y).T
    assert scores.shape == (4, 12)
    assert np.allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-6)


def test_method_specs_carry_kfac_mix_beta_and_normalize():
    assert lds.parse_method("dropout:kfac_mix=0.25") == ("dropout", "kfac_mix", "none", 0.25)
    assert lds.parse_method("dropout:kfac_mix=0.75:cosine") == ("dropout", "kfac_mix", "cosine", 0.75)
    assert lds.parse_method("dropout:kfac") == ("dropout", "kfac", "none", None)
    assert lds.parse_method("none") == ("none", "gauss_newton", "none", None)
    assert lds.method_name("dropout", "kfac_mix", "none", 0.25) == "dropout, kfac_mix β=0.25"
    assert lds.method_name("dropout", "kfac", "cosine", None) == "dropout, kfac, normalize cosine"


def test_mlp_setting_runs_kfac_and_its_mixture_whose_beta_reaches_distinf(tmp_path):
    """The mlp setting end to end with kfac and kfac_mix=β rows; β reaches hessian.mix: kfac_mix
    with β = 0 scores as kfac, with β = 1 as gauss_newton (the same index set and damping rule)."""
    data = fake_fashion_mnist(tmp_path / "fm", n_train=60, n_test=20)
    out = tmp_path / "out.md"
    lds.main(["--setting", "mlp", "--data", str(data), "--n-train", "60", "--n-test", "10", "--subsets", "4",
              "--epochs", "1", "--batch-size", "16", "--ks", "256", "--work", str(tmp_path / "work"),
              "--methods", "dropout:kfac", "dropout:kfac_mix=0.25", "--out", str(out),
              "--per-query", str(tmp_path / "rows.npz")])
    names = [line.split("|")[1].strip() for line in out.read_text().splitlines()
             if line.startswith("| ") and "method" not in line]
    assert names == ["dropout, kfac", "dropout, kfac_mix β=0.25", "random scores (floor)"]
    assert "FashionMLP" in out.read_text()
    rows = np.load(tmp_path / "rows.npz")
    assert sorted(rows.files) == ["dropout:kfac_mix=0.25|k=256|seed=0",
                                  "dropout:kfac|k=256|seed=0"]
    mean = float(out.read_text().split("| dropout, kfac | 256 | ")[1].split(" ±")[0])
    assert np.nanmean(rows["dropout:kfac|k=256|seed=0"]) == pytest.approx(mean, abs=5e-4)

    args = type("Args", (), {"data": data, "seed": 0, "n_train": 60, "n_test": 10, "epochs": 1,
                             "batch_size": 16, "lr": None})()
    setting = lds.mlp_setting(args)
    model = lds.trained(setting, lds.initial_state(setting, 0), torch.arange(60), 0)
    score = lambda hessian, mix=None: lds.attribution(model, setting, "dropout", hessian, 256, 0, "none", mix)[0]  # noqa: E731
    kfac, gram, quarter = score("kfac"), score("gauss_newton"), score("kfac_mix", 0.25)
    assert np.allclose(score("kfac_mix", 0.0), kfac, rtol=1e-5, atol=1e-7)
    assert np.allclose(score("kfac_mix", 1.0), gram, rtol=1e-5, atol=1e-7)
    assert not np.allclose(quarter, kfac, rtol=1e-3) and not np.allclose(quarter, gram, rtol=1e-3)


def test_paired_differences_average_over_shared_index_seeds():
    from benchmarks.quality import lds_paired

    rng = np.random.default_rng(0)
    base = {s: rng.standard_normal(50) for s in (0, 1)}
    saved = {f"b|k=8|seed={s}": v for s, v in base.items()}
    saved.update({f"a|k=8|seed={s}": v + 0.1 * (s + 1) for s, v in base.items()})
    saved["a|k=8|seed=2"] = np.zeros(50)  # no baseline for seed 2: left out
    saved["peer:x"] = np.ones(50)
    [(k, mean, se, unpaired, seeds)] = lds_paired.paired(saved, "a", "b")
    assert (k, seeds) == ("8", 2)
    assert mean == pytest.approx(0.15) and se == pytest.approx(0.0, abs=1e-12)
    together = (base[0] + base[1]) / 2
    assert unpaired == pytest.approx(together.std(ddof=1) / np.sqrt(50))
