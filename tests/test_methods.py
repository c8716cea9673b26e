"""The paper's comparison systems, each against an independent reference on a tiny model or synthetic data.

Compressions: the [n, k] gradients distinf.attribute returns equal an explicit matrix applied to
full per-example gradients from torch.func (the matrices are materialised here, in the test only).
Solvers: the scores equal the method's formula computed densely, with no code of distinf.core.solvers.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import distinf
import tiny_models
from distinf.config import AttributionConfig, ConfigError, parse_config
from distinf.core.compressors import build_compressor, gaussian
from distinf.core.compressors.fjlt import hadamard_transform
from distinf.core.compressors.logra import factor_ranks
from distinf.core.compressors.pca import PCAFit
from distinf.core.curvature import AUTO_DAMPING_SCALE
from distinf.core.curvatures import fit_solver
from distinf.core.solvers import DataInfSums, lissa_samples
from distinf.core.tracking import track_modules
from test_influence import QUERIES, TRAIN, dense_reference, full_gradients, micro_gpt2


def attribute(model, config, train=TRAIN, queries=QUERIES, **kwargs):
    """distinf.attribute with raw scores (scoring.normalize: none), the quantity the references compute."""
    return distinf.attribute(model, train, queries, batch_size=3, config={"scoring": {"normalize": "none"}, **config},
                             **kwargs)


def tracked_names(model):
    return [name for name, _ in track_modules(model).param_shapes]


def columns_of(result):
    """{param: column slice} from the result's index-set table (runs of one param are its block)."""
    params = result.index_set.column("param").to_pylist()
    out, start = {}, 0
    for name in dict.fromkeys(params):
        size = params.count(name)
        out[name] = slice(start, start + size)
        start += size
    return out


def split(full, model, names):
    """Full gradients [n, p] -> {param: [n, p_l]} in named_parameters order."""
    out, start = {}, 0
    for name in names:
        size = model.get_parameter(name).numel()
        out[name] = full[:, start : start + size]
        start += size
    return out


def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1, 1], [1, -1]]), h)
    return torch.from_numpy(h)


def block_diag_solve(G, Q, slices, damping="auto"):
    """Dense gauss_newton reference on given (compressed) gradients, float64."""
    n = G.shape[0]
    H = torch.zeros(G.shape[1], G.shape[1], dtype=torch.float64)
    for part in slices:
        Gb = G[:, part]
        lam = AUTO_DAMPING_SCALE * Gb.square().sum() / (n * Gb.shape[1]) if damping == "auto" else damping
        H[part, part] = Gb.T @ Gb / n + lam * torch.eye(Gb.shape[1], dtype=torch.float64)
    return Q @ torch.linalg.solve(H, G.T)


# --- compression.method: none


@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_none_equals_the_dense_solve_on_torch_func_gradients(blocks):
    model = micro_gpt2()
    result = attribute(model, {"compression": {"method": "none"}, "hessian": {"blocks": blocks}})
    names = tracked_names(model)
    G = full_gradients(model, TRAIN, names)
    torch.testing.assert_close(torch.from_numpy(result.train_grads).double(), G, rtol=1e-5, atol=1e-7)
    sizes = [model.get_parameter(n).numel() for n in names]
    bounds = np.cumsum([0, *sizes])
    slices = [slice(0, bounds[-1])] if blocks == "full" else [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    scores, self_inf = dense_reference(model, names, "auto", slices)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_allclose(result.self_influence, self_inf, rtol=1e-4)
    assert result.index_set.column("flat_index").to_pylist()[: sizes[0]] == list(range(sizes[0]))


def test_none_conv2d_groups_and_embedding_padding_match_vmap_grad():
    model = tiny_models.small_cnn()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(5, 1, 8, 8, generator=generator), torch.randint(0, 4, (5,), generator=generator)
    examples = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)]

    def task(m, batch):
        return F.cross_entropy(m(batch["pixel_values"]), batch["labels"], reduction="none")

    result = distinf.attribute(model, examples, examples[:1], task=task, batch_size=2,
                               config={"compression": {"method": "none"}})
    tracked = {n: p.detach() for n, p in model.named_parameters() if "norm" not in n}
    rest = {**{n: p.detach() for n, p in model.named_parameters() if "norm" in n}, **dict(model.named_buffers())}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, {**p, **rest}, (x[None],)), y[None])

    full = torch.func.vmap(grad(loss), in_dims=(None, 0, 0))(tracked, images, labels)
    reference = torch.cat([full[n].reshape(5, -1) for n in tracked], dim=1)
    torch.testing.assert_close(torch.from_numpy(result.train_grads), reference, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(11, 4, padding_idx=2), torch.nn.Linear(4, 3))
    rows = [{"ids": torch.tensor(ids), "labels": torch.tensor(c)} for ids, c in [([1, 2, 2, 5], 0), ([2, 7, 7, 7], 1)]]

    def emb_task(m, batch):
        return F.cross_entropy(m(batch["ids"]).mean(1), batch["labels"], reduction="none")

    got = distinf.attribute(emb, rows, rows[:1], task=emb_task, config={"compression": {"method": "none"}})
    params = {n: p.detach() for n, p in emb.named_parameters()}
    for i, row in enumerate(rows):
        g = grad(lambda p: F.cross_entropy(functional_call(emb, p, (row["ids"][None],)).mean(1), row["labels"][None]))(params)
        torch.testing.assert_close(torch.from_numpy(got.train_grads[i]), torch.cat([v.reshape(-1) for v in g.values()]),
                                   rtol=1e-5, atol=1e-7)


def test_none_refuses_clearly_when_p_does_not_fit(monkeypatch):
    from distinf.core.compressors import none

    monkeypatch.setattr(none, "available_bytes", lambda: 1 << 20)
    with pytest.raises(MemoryError, match=r"compression.method: none keeps all p = 1,216 .*n·p·4 bytes.* is available"):
        attribute(micro_gpt2(), {"compression": {"method": "none"}, "hessian": {"blocks": "full"}})


# --- compression.method: gaussian, fjlt, logra, pca


def reference_projection(model, result, project):
    """Full torch.func gradients of the training set, each tensor's block mapped by project(name, [n, p_l])."""
    names = tracked_names(model)
    blocks = split(full_gradients(model, TRAIN, names), model, names)
    return torch.cat([project(name, blocks[name]) for name in columns_of(result)], dim=1)


def test_gaussian_equals_the_dense_product_with_its_matrix(monkeypatch):
    monkeypatch.setattr(gaussian, "BLOCK_ELEMENTS", 1000)  # many generated column blocks per tensor
    model = micro_gpt2()
    config = {"compression": {"method": "gaussian", "k": 200, "seed": 4}}
    result = attribute(model, config)
    compressor = build_compressor(track_modules(model), "gaussian", 200, seed=4)
    assert len(compressor.column_blocks("transformer.wte.weight")) > 1
    reference = reference_projection(model, result, lambda name, g: g @ compressor.matrix(name).double().T)
    assert result.train_grads.shape[1] == 200
    torch.testing.assert_close(torch.from_numpy(result.train_grads).double(), reference, rtol=1e-4, atol=1e-6)
    # The matrix is N(0, 1/k_l) and regenerated identically; another seed gives another matrix.
    matrix = compressor.matrix("transformer.wte.weight")
    k_l = matrix.shape[0]
    assert abs(float(matrix.mean())) * math.sqrt(k_l) < 0.05 and 0.9 < float(matrix.var()) * k_l < 1.1
    torch.testing.assert_close(matrix, build_compressor(track_modules(model), "gaussian", 200, 4).matrix("transformer.wte.weight"))
    assert not torch.equal(matrix, build_compressor(track_modules(model), "gaussian", 200, 5).matrix("transformer.wte.weight"))


def test_hadamard_transform_equals_the_sylvester_matrix():
    for n in (1, 2, 32, 128, 2048):  # 128 = 32 x 4: factors of unequal size
        x = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(hadamard_transform(x.float()).double(), x @ sylvester(n), rtol=1e-5, atol=1e-4)


def test_fjlt_equals_its_explicit_matrix():
    model = micro_gpt2()
    result = attribute(model, {"compression": {"method": "fjlt", "k": 150, "seed": 2}})
    compressor = build_compressor(track_modules(model), "fjlt", 150, seed=2)

    def explicit(name, g):
        p_l = g.shape[1]
        n = 1 << math.ceil(math.log2(p_l))
        rows = compressor.rows(name)
        assert len(set(rows.tolist())) == len(rows) and rows.max() < n
        phi = sylvester(n)[rows][:, :p_l] * compressor.signs(name).double() / math.sqrt(len(rows))
        return g @ phi.T

    reference = reference_projection(model, result, explicit)
    torch.testing.assert_close(torch.from_numpy(result.train_grads).double(), reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [micro_gpt2, tiny_models.llama], ids=["gpt2-conv1d-tied", "llama-linear"])
def test_logra_equals_the_kronecker_product_of_its_projections(make):
    model = make()
    train = [{k: (v % 31 if k == "input_ids" else v) for k, v in ex.items()} for ex in TRAIN]
    result = distinf.attribute(model, train, QUERIES, batch_size=3, config={"compression": {"method": "logra", "k": 300}})
    compressor = build_compressor(track_modules(model), "logra", 300)
    names = tracked_names(model)
    blocks = split(full_gradients(model, train, names), model, names)
    parts = []
    for name in columns_of(result):
        shape = model.get_parameter(name).shape
        rows, cols = shape[0], math.prod(shape[1:])
        p_a, p_b = compressor.projections(name)
        p_a = torch.eye(rows) if p_a is None else p_a
        p_b = torch.eye(cols) if p_b is None else p_b
        parts.append(blocks[name] @ torch.kron(p_a, p_b).double().T)  # row-major vec(P_a G P_bᵀ)
    torch.testing.assert_close(torch.from_numpy(result.train_grads).double(), torch.cat(parts, dim=1),
                               rtol=1e-4, atol=1e-6)
    assert result.train_grads.shape[1] <= 300


def test_logra_ranks_fill_each_share_with_both_sides_compressed_alike():
    for k_l, rows, cols in [(20, 576, 576), (1726, 49152, 576), (7, 3, 100), (50, 5, 1), (1, 9, 9), (997, 64, 64)]:
        r_a, r_b = factor_ranks(k_l, rows, cols)
        assert r_a * r_b <= k_l and r_a <= rows and r_b <= cols
        assert r_a * r_b >= 0.9 * min(k_l, rows * cols) or (r_a, r_b) in ((rows, 1), (1, cols)), (k_l, r_a, r_b)
    assert factor_ranks(20, 576, 576) in ((4, 5), (5, 4))
    r_a, r_b = factor_ranks(1726, 49152, 576)
    assert 0.5 < (r_a / r_b) / (49152 / 576) < 2


def low_rank(n, p, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, rank, generator=generator, dtype=torch.float64))
    sigma = torch.linspace(10, 1, rank, dtype=torch.float64)
    return (u * sigma) @ v.T, v.T  # G [n, p], its right singular vectors [rank, p], strongest first


@pytest.mark.parametrize("n, p", [(12, 40), (60, 20)], ids=["rows-fit", "moment-fit"])
def test_pca_recovers_the_top_directions_of_a_low_rank_gradient_set(n, p):
    G, directions = low_rank(n, p, rank=5)
    fit = PCAFit(["w"], [(p,)], [3], n_train=n)
    for start in range(0, n, 7):  # streamed in batches
        fit.add({"w": G[start : start + 7].float()})
    components = fit.finish().components["w"].double()
    assert components.shape == (3, p)
    torch.testing.assert_close(components @ components.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close((components @ directions[:3].T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    # Asked for more than the rank, it keeps the rank: the training gradients span no more.
    more = PCAFit(["w"], [(p,)], [9], n_train=n).add({"w": G.float()}).finish()
    assert more.layout.sizes == (5,)


def test_pca_scores_equal_the_dense_solve_in_the_training_row_space():
    model = micro_gpt2()
    result = attribute(model, {"compression": {"method": "pca", "k": 10**6}})  # k_l ≥ n: the whole row space
    names = tracked_names(model)
    blocks = split(full_gradients(model, TRAIN, names), model, names)
    qblocks = split(full_gradients(model, QUERIES, names), model, names)
    G, Q, slices, start = [], [], [], 0
    for name in names:
        _, s, vh = torch.linalg.svd(blocks[name], full_matrices=False)
        v = vh[s > 1e-5 * s[0]]  # the fit drops directions with variance below 1e-10 of the largest
        G.append(blocks[name] @ v.T)
        Q.append(qblocks[name] @ v.T)
        slices.append(slice(start, start + len(v)))
        start += len(v)
    reference = block_diag_solve(torch.cat(G, 1), torch.cat(Q, 1), slices).numpy()
    assert result.train_grads.shape[1] == start
    np.testing.assert_allclose(result.scores, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())


# --- hessian.method


def compressed(model, hessian, k=120):
    return attribute(model, {"compression": {"k": k, "seed": 1}, "hessian": hessian})


def test_identity_equals_raw_dot_products():
    model = micro_gpt2()
    result = compressed(model, {"method": "identity"})
    np.testing.assert_allclose(result.scores, result.query_grads.astype(np.float64) @ result.train_grads.T.astype(np.float64),
                               rtol=1e-5)
    np.testing.assert_allclose(result.self_influence, np.square(result.train_grads.astype(np.float64)).sum(1), rtol=1e-5)
    whole = attribute(model, {"compression": {"method": "none"}, "hessian": {"method": "identity"}})
    names = tracked_names(model)
    G, Q = full_gradients(model, TRAIN, names), full_gradients(model, QUERIES, names)
    np.testing.assert_allclose(whole.scores, (Q @ G.T).numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("blocks, damping", [("layer", "auto"), ("full", 0.05)])
def test_datainf_equals_its_formula_computed_densely(blocks, damping):
    result = compressed(micro_gpt2(), {"method": "datainf", "blocks": blocks, "damping": damping})
    G = torch.from_numpy(result.train_grads).double()
    Q = torch.from_numpy(result.query_grads).double()
    n = G.shape[0]
    slices = list(columns_of(result).values()) if blocks == "layer" else [slice(0, G.shape[1])]
    inverse = torch.zeros(G.shape[1], G.shape[1], dtype=torch.float64)
    for part in slices:
        Gb = G[:, part]
        size = Gb.shape[1]
        lam = AUTO_DAMPING_SCALE * Gb.square().sum() / (n * size) if damping == "auto" else damping
        # (1/n) Σ_i (λI + g_i g_iᵀ)⁻¹, each inverse taken directly
        inverse[part, part] = sum(torch.linalg.inv(lam * torch.eye(size, dtype=torch.float64) + torch.outer(g, g))
                                  for g in Gb) / n
    np.testing.assert_allclose(result.scores, (Q @ inverse @ G.T).numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(result.self_influence, torch.einsum("ik,kl,il->i", G, inverse, G).numpy(), rtol=1e-5)


def test_datainf_solved_in_place_equals_its_solve_in_the_sums_own_storage():
    g = torch.randn(20, 9, dtype=torch.float64)
    slices, damping = [slice(0, 4), slice(4, 9)], [0.3, 2.0]
    reference = DataInfSums(slices, damping).add(g).solve()
    sums = DataInfSums(slices, damping).add(g[:7]).merge(DataInfSums(slices, damping).add(g[7:]))
    storage = [b.data_ptr() for b in sums.blocks]
    solved = sums.solve_()
    for mine, theirs, ptr in zip(solved.inverses, reference.inverses, storage):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
        assert mine.data_ptr() == ptr
    assert solved.count == 20 and solved.damping == damping


def test_lissa_converges_to_the_exact_solve_as_iterations_grow():
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(30, 9, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2, 9, dtype=torch.float64)
    Q = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    slices = [slice(0, 4), slice(4, 9)]
    exact = block_diag_solve(G, Q, slices).T  # [n, m] = G H⁻¹ Qᵀ
    ids = [f"ex{i}" for i in range(30)]
    errors = []
    for iterations in (0, 10, 100, 1000):
        solver = fit_solver("lissa", slices, G, "auto", ids, lissa_iterations=iterations, lissa_batch_size=30)
        approx = G @ solver.precondition(Q).T
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8, errors
    # Sampled batches (8 of 30): a stochastic estimate, still far closer than no iteration at all.
    sampled = fit_solver("lissa", slices, G, "auto", ids, lissa_iterations=400, lissa_batch_size=8)
    assert float((G @ sampled.precondition(Q).T - exact).norm() / exact.norm()) < 0.5 * errors[0]


def test_lissa_batches_depend_on_ids_not_their_order():
    ids = [f"doc-{i}" for i in range(50)]
    shuffled = list(np.random.default_rng(0).permutation(ids))
    for a, b in zip(lissa_samples(ids, 5, 8, seed=3), lissa_samples(shuffled, 5, 8, seed=3)):
        assert [ids[i] for i in a] == [shuffled[i] for i in b]
    assert lissa_samples(ids, 1, 8, seed=3)[0].tolist() != lissa_samples(ids, 1, 8, seed=4)[0].tolist()


def test_lissa_in_attribute_runs_the_recursion_on_the_captured_gradients():
    result = compressed(micro_gpt2(), {"method": "lissa", "lissa_iterations": 3, "lissa_batch_size": 4})
    G = torch.from_numpy(result.train_grads).double()
    Q = torch.from_numpy(result.query_grads).double()
    slices = list(columns_of(result).values())
    ids = [str(i) for i in range(len(G))]
    chosen = lissa_samples(ids, 3, 4, seed=0)
    expected = torch.empty_like(Q)
    for part, lam in zip(slices, result.damping):
        batches = [G[rows][:, part] for rows in chosen]
        scale = lam + max(float(torch.linalg.eigvalsh(b.T @ b / len(b))[-1]) for b in batches)
        v = h = Q[:, part]
        for b in batches:
            h = v + h - (h @ b.T @ b / len(b) + lam * h) / scale
        expected[:, part] = h / scale
    np.testing.assert_allclose(result.scores, (expected @ G.T).numpy(), rtol=1e-6, atol=1e-10)


# --- configuration


def test_method_keys_validate_and_name_the_key():
    assert parse_config({"hessian": {"method": "lissa", "lissa_iterations": 50}}, AttributionConfig).hessian.lissa_iterations == 50
    with pytest.raises(ConfigError, match="hessian: lissa_iterations is only used with method: lissa"):
        parse_config({"hessian": {"lissa_iterations": 5}}, AttributionConfig)
    with pytest.raises(ConfigError, match="hessian.lissa_scale"):
        parse_config({"hessian": {"method": "lissa", "lissa_scale": 0}}, AttributionConfig)
    with pytest.raises(ConfigError, match="compression.method"):
        parse_config({"compression": {"method": "srht"}}, AttributionConfig)
