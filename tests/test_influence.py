"""attribute() against a dense solve built from full torch.func gradients, independently of distinf."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from transformers import GPT2Config, GPT2LMHeadModel

import distinf
import tiny_models
from distinf.core.curvature import AUTO_DAMPING_SCALE, Curvature, GramSums, block_damping, factorize, factorize_


def micro_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=31, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def full_gradients(model, examples, names):
    """[n, p] per-example gradients of the tracked parameters, in named_parameters order."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    for example in examples:
        ids = example["input_ids"][None] % 31

        def loss(tracked):
            logits = functional_call(model, {**params, **tracked}, args=(), kwargs={"input_ids": ids}).logits[0]
            return F.cross_entropy(logits[:-1], ids[0, 1:])

        g = grad(loss)({n: params[n] for n in names})
        rows.append(torch.cat([g[n].reshape(-1) for n in names]).double())
    return torch.stack(rows)


def examples(lengths, seed):
    return [{k: (v % 31 if k == "input_ids" else v) for k, v in ex.items()}
            for ex in tiny_models.token_examples(lengths, seed=seed)]


TRAIN, QUERIES = examples((5, 8, 3, 7, 6, 4, 9, 5), seed=1), examples((6, 4, 7), seed=2)
RAW = {"normalize": "none"}  # the paper's influence ĝ_qᵀĤ⁻¹ĝ_i, which the dense solves here compute


def dense_reference(model, names, damping, blocks):
    G, Q = full_gradients(model, TRAIN, names), full_gradients(model, QUERIES, names)
    n = G.shape[0]
    H = torch.zeros(G.shape[1], G.shape[1], dtype=torch.float64)
    for part in blocks:
        Gb = G[:, part]
        lam = AUTO_DAMPING_SCALE * Gb.square().sum() / (n * Gb.shape[1]) if damping == "auto" else damping
        H[part, part] = Gb.T @ Gb / n + lam * torch.eye(Gb.shape[1], dtype=torch.float64)
    Hinv_G = torch.linalg.solve(H, G.T)
    return (Q @ Hinv_G).numpy(), torch.einsum("ip,pi->i", G, Hinv_G).numpy()


@pytest.mark.parametrize("damping", [1e-3, "auto"])
def test_full_block_with_every_entry_kept_equals_dense_solve(damping):
    model = micro_gpt2()
    result = distinf.attribute(model, TRAIN, QUERIES, batch_size=3, config={
        "compression": {"k": 10**9}, "hessian": {"blocks": "full", "damping": damping}, "scoring": RAW})
    names = list(dict.fromkeys(result.index_set.column("param").to_pylist()))
    p = sum(model.get_parameter(n).numel() for n in names)
    assert result.train_grads.shape[1] == p  # every tracked entry kept
    scores, self_inf = dense_reference(model, names, damping, [slice(0, p)])
    np.testing.assert_allclose(result.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_allclose(result.self_influence, self_inf, rtol=1e-4)


def test_layer_blocks_equal_block_diagonal_dense_solve():
    model = micro_gpt2()
    result = distinf.attribute(model, TRAIN, QUERIES, batch_size=4, config={
        "compression": {"k": 10**9}, "hessian": {"blocks": "layer", "damping": "auto"}, "scoring": RAW})
    names = list(dict.fromkeys(result.index_set.column("param").to_pylist()))
    sizes = [model.get_parameter(n).numel() for n in names]
    bounds = np.cumsum([0, *sizes])
    scores, self_inf = dense_reference(model, names, "auto", [slice(a, b) for a, b in zip(bounds, bounds[1:])])
    np.testing.assert_allclose(result.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_allclose(result.self_influence, self_inf, rtol=1e-4)


@pytest.mark.parametrize("normalize", ["relatif", "cosine", "unit"])
def test_normalised_scores_equal_the_dense_solve_divided_as_documented(normalize):
    model = micro_gpt2()
    result = distinf.attribute(model, TRAIN, QUERIES, batch_size=3, config={
        "compression": {"k": 10**9}, "hessian": {"blocks": "full", "damping": 1e-3},
        "scoring": {"normalize": normalize, "self_influence": False}})
    names = list(dict.fromkeys(result.index_set.column("param").to_pylist()))
    G, Q = full_gradients(model, TRAIN, names), full_gradients(model, QUERIES, names)
    H = G.T @ G / G.shape[0] + 1e-3 * torch.eye(G.shape[1], dtype=torch.float64)
    raw = (Q @ torch.linalg.solve(H, G.T)).numpy()
    self_train = torch.einsum("ip,pi->i", G, torch.linalg.solve(H, G.T)).numpy()
    self_query = torch.einsum("qp,pq->q", Q, torch.linalg.solve(H, Q.T)).numpy()
    divisor = {"relatif": np.outer(np.ones(len(QUERIES)), np.sqrt(self_train)),
               "cosine": np.sqrt(np.outer(self_query, self_train)),
               "unit": np.outer(Q.norm(dim=1).numpy(), G.norm(dim=1).numpy())}[normalize]
    expected = raw / divisor
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    if normalize == "cosine":
        assert np.abs(result.scores).max() <= 1 + 1e-6
    assert np.isnan(result.self_influence).all()  # off, even though the normalisation needed it
    np.testing.assert_allclose(result.train_values.column("score_mean").to_numpy(), expected.mean(0), rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_every_score_table_carries_the_raw_influence_of_a_dense_solve_next_to_the_cosine():
    """The default ranks by the cosine; `influence` beside it is the undivided ĝ_qᵀĤ⁻¹ĝ_i of a dense
    solve, in the result, in top_k (for the same pairs) and, averaged over queries, in train_values."""
    model = micro_gpt2()
    result = distinf.attribute(model, TRAIN, QUERIES, batch_size=3, train_ids=list("abcdefgh"), config={
        "compression": {"k": 10**9}, "hessian": {"blocks": "full", "damping": 1e-3}, "scoring": {"top_k": 4}})
    names = list(dict.fromkeys(result.index_set.column("param").to_pylist()))
    G, Q = full_gradients(model, TRAIN, names), full_gradients(model, QUERIES, names)
    H = G.T @ G / G.shape[0] + 1e-3 * torch.eye(G.shape[1], dtype=torch.float64)
    raw = (Q @ torch.linalg.solve(H, G.T)).numpy()
    self_train = torch.einsum("ip,pi->i", G, torch.linalg.solve(H, G.T)).numpy()
    self_query = torch.einsum("qp,pq->q", Q, torch.linalg.solve(H, Q.T)).numpy()
    cosine = raw / np.sqrt(np.outer(self_query, self_train))
    tolerance = {"rtol": 1e-4, "atol": 1e-4 * np.abs(raw).max()}
    np.testing.assert_allclose(result.influence, raw, **tolerance)
    np.testing.assert_allclose(result.scores, cosine, rtol=1e-4, atol=1e-4)
    assert not np.allclose(result.scores, result.influence)  # two different numbers, not one copied
    column = {t: i for i, t in enumerate("abcdefgh")}
    for row in result.top_k.to_pylist():
        q, i = int(row["query_id"]), column[row["train_id"]]
        np.testing.assert_allclose(row["score"], cosine[q, i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(row["influence"], raw[q, i], **tolerance)
    for q in range(len(QUERIES)):  # ranked by the cosine, not by the influence, both ways
        for kind, order in (("proponent", np.argsort(-cosine[q], kind="stable")),
                            ("opponent", np.argsort(cosine[q], kind="stable"))):
            ranked = [column[r["train_id"]] for r in result.top_k.to_pylist()
                      if r["query_id"] == str(q) and r["kind"] == kind]
            assert ranked == list(order[:4])
    values = result.train_values
    np.testing.assert_allclose(values.column("influence_mean").to_numpy(), raw.mean(0), **tolerance)
    np.testing.assert_allclose(values.column("score_mean").to_numpy(), cosine.mean(0), rtol=1e-4, atol=1e-4)


def test_top_k_and_train_values_follow_the_score_matrix():
    result = distinf.attribute(tiny_models.gpt2(), tiny_models.token_examples((5, 8, 3, 7, 6, 4, 9)),
                               tiny_models.token_examples((6, 4), seed=9), train_ids=list("abcdefg"),
                               query_ids=["q0", "q1"], config={"compression": {"k": 256}, "scoring": {"top_k": 3, **RAW}})
    top = result.top_k.to_pylist()
    assert result.top_k.column_names == ["query_id", "rank", "train_id", "score", "influence", "kind"]
    for q, query_id in enumerate(["q0", "q1"]):
        for kind, order in (("proponent", np.argsort(-result.scores[q], kind="stable")),
                            ("opponent", np.argsort(result.scores[q], kind="stable"))):
            rows = [r for r in top if r["query_id"] == query_id and r["kind"] == kind]
            assert [r["rank"] for r in rows] == [1, 2, 3]
            assert [r["train_id"] for r in rows] == ["abcdefg"[i] for i in order[:3]]
            np.testing.assert_allclose([r["score"] for r in rows], result.scores[q][order[:3]], rtol=1e-6)
    assert result.top_k.column("score").to_numpy().min() < 0  # the opponents' scores are negative here
    values = result.train_values.to_pydict()
    np.testing.assert_allclose(values["score_mean"], result.scores.mean(0), rtol=1e-6)
    np.testing.assert_allclose(values["loss"], result.train_losses)
    assert np.all(result.self_influence >= 0)


def test_auto_damping_is_a_tenth_of_the_mean_eigenvalue():
    g = torch.randn(50, 12, dtype=torch.float64)
    sums = GramSums([slice(0, 5), slice(5, 12)]).add(g[:20]).add(g[20:])
    for block, part in zip(sums.blocks, sums.slices):
        eigenvalues = torch.linalg.eigvalsh(g[:, part].T @ g[:, part] / 50)
        assert block_damping(block, 50, "auto") == pytest.approx(0.1 * float(eigenvalues.mean()), rel=1e-12)
        assert block_damping(block, 50, 0.25) == 0.25
    assert factorize(sums, "auto").damping == pytest.approx(
        [0.1 * float(g[:, :5].square().sum()) / (50 * 5), 0.1 * float(g[:, 5:].square().sum()) / (50 * 7)])


def test_gram_sums_are_additive_in_any_order():
    g = torch.randn(30, 6, dtype=torch.float64)
    whole = GramSums([slice(0, 6)]).add(g)
    parts = GramSums([slice(0, 6)]).add(g[10:]).merge(GramSums([slice(0, 6)]).add(g[:10]))
    torch.testing.assert_close(whole.blocks[0], parts.blocks[0], rtol=1e-12, atol=1e-12)
    assert parts.count == 30


def test_zero_damping_on_a_rank_deficient_block_is_refused_clearly():
    sums = GramSums([slice(0, 6)]).add(torch.randn(3, 6))  # rank 3 < 6
    with pytest.raises(ValueError, match="not positive definite.*damping"):
        factorize(sums, 0.0)


@pytest.mark.parametrize("damping", ["auto", 0.3])
def test_in_place_factorisation_equals_cholesky_of_the_damped_gram(damping):
    torch.manual_seed(3)
    slices = [slice(0, 7), slice(7, 8), slice(8, 40), slice(40, 41)]
    g = torch.randn(25, 41, dtype=torch.float32)
    g[:, 40] = 0  # a block no example touches: zero Gram, λ = 1
    sums = GramSums(slices).add(g[:9]).add(g[9:])
    kept = factorize(sums, damping)  # the copying factorisation leaves the sums as they were
    storage = [b.data_ptr() for b in sums.blocks]
    curvature = factorize_(sums, damping)
    x = g.double()
    for i, part in enumerate(slices):
        size = part.stop - part.start
        gram = x[:, part].T @ x[:, part]
        mean_eigenvalue = float(torch.trace(gram)) / (25 * size)
        lam = damping if damping != "auto" else (AUTO_DAMPING_SCALE * mean_eigenvalue if mean_eigenvalue > 0 else 1.0)
        reference = torch.linalg.cholesky(gram / 25 + lam * torch.eye(size, dtype=torch.float64))
        assert curvature.damping[i] == pytest.approx(lam, rel=1e-12)
        torch.testing.assert_close(curvature.cholesky[i], reference, rtol=1e-10, atol=1e-12)
        assert curvature.cholesky[i].data_ptr() == storage[i]  # the Gram block's own storage
        assert torch.equal(curvature.cholesky[i], kept.cholesky[i])  # and factorize's very numbers
    assert curvature.damping == kept.damping and curvature.count == kept.count == 25


def test_a_curvature_pickles_its_factors_out_of_band_and_reads_back_equal():
    # Ray's object store pickles with protocol 5: the factors travel as buffers, not in the pickle.
    sums = GramSums([slice(0, 30), slice(30, 50)]).add(torch.randn(40, 50))
    curvature = factorize_(sums)
    buffers = []
    data = pickle.dumps(curvature, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 2 and len(data) < 1000
    back = pickle.loads(data, buffers=buffers)
    assert isinstance(back, Curvature) and back.damping == curvature.damping and back.count == curvature.count
    assert all(torch.equal(a, b) for a, b in zip(back.cholesky, curvature.cholesky))
    queries = torch.randn(3, 50)
    assert torch.equal(back.precondition(queries), curvature.precondition(queries))
