"""hessian.method kfac / kfac_mix: the Kronecker factors of the kept entries against dense torch.kron
of factors computed from the full layer inputs and output gradients, seen by plain hooks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distinf
import tiny_models
from distinf.batching import collate
from distinf.config import ConfigError, JobConfig, parse_config
from distinf.core.capture import GradientCapture
from distinf.core.curvature import AUTO_DAMPING_SCALE, zero_blocks
from distinf.core.index_set import draw_index_set
from distinf.core.kfac import FactorSums
from distinf.core.tasks import causal_lm_losses
from distinf.core.tracking import track_modules


def record_layers(model, names, batches, loss_fn):
    """{module name: [(input, output gradient)] per batch}, by plain forward hooks and tensor hooks."""
    seen = {name: [] for name in names}
    batch_size = [0]
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def per_example(mod, args):  # a shared [1, T] input (position ids) stands for every example
            x = args[0]
            return (x.expand(batch_size[0], *x.shape[1:]), *args[1:]) if x.shape[0] == 1 else None

        def keep(mod, args, out, name=name):
            pair = [args[0].detach(), None]
            seen[name].append(pair)
            out.register_hook(lambda g: pair.__setitem__(1, g.detach()))

        handles += [module.register_forward_pre_hook(per_example), module.register_forward_hook(keep)]
    for batch in batches:
        batch_size[0] = len(next(iter(batch.values())))
        model.zero_grad()
        loss_fn(model, batch).sum().backward()
    for handle in handles:
        handle.remove()
    return seen


def linear_factors(pairs):
    """(Σ x xᵀ over active positions, their number, Σ gy gyᵀ) from [N, ..., in] / [N, ..., out] pairs."""
    a = g = m = 0
    for x, gy in pairs:
        x, gy = x.double().reshape(x.shape[0], -1, x.shape[-1]), gy.double().reshape(gy.shape[0], -1, gy.shape[-1])
        active = gy.ne(0).any(-1)
        a = a + torch.einsum("nti,ntj,nt->ij", x, x, active.double())
        g = g + torch.einsum("nti,ntj->ij", gy, gy)
        m += int(active.sum())
    return a, m, g


def restricted(dense, flat):
    index = torch.from_numpy(flat)
    return dense[index][:, index]


def kfac_blocks(model, index_set, batches, loss_fn):
    """{tensor name: K_S} from FactorSums filled by the capture, and the FactorSums."""
    tracked = track_modules(model)
    factors = FactorSums(tracked, index_set)
    with GradientCapture(model, tracked, index_set, factors=factors) as capture:
        for batch in batches:
            capture.batch(batch, loss_fn)
    return {name: f.block_sum(factors.count) / factors.count for name, f in factors.tensors.items()}, factors


def gpt2_batches():
    examples = tiny_models.token_examples((5, 9, 3, 7, 6, 4, 8))
    return [collate(examples[i : i + 3], 0) for i in range(0, len(examples), 3)]


def test_conv1d_and_position_embedding_equal_rows_of_dense_kron():
    """GPT-2 (HF Conv1D, padded causal-LM batches): K_S is kron(A, G) at S for every Conv1D weight and
    bias and the position embedding; the tied token embedding falls back to the Gram."""
    torch.manual_seed(0)
    model = tiny_models.gpt2()
    index_set = draw_index_set(track_modules(model).param_shapes, 3000, seed=3)
    batches = gpt2_batches()
    blocks, factors = kfac_blocks(model, index_set, batches, causal_lm_losses)
    n = factors.count
    assert factors.gram_fallback == ["transformer.wte.weight"]
    flat = dict(zip(index_set.names, index_set.flat_indices))
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    seen = record_layers(model, conv1d + ["transformer.wpe"], batches, causal_lm_losses)
    checked = 0
    for name in conv1d:
        a, m, g = linear_factors(seen[name])
        torch.testing.assert_close(blocks[f"{name}.weight"],
                                   restricted(torch.kron(a / m, g / n), flat[f"{name}.weight"]))
        torch.testing.assert_close(blocks[f"{name}.bias"], restricted(g / n, flat[f"{name}.bias"]))
        checked += 2
    # position embedding: the one-hot of each position id, over positions whose output gradient is not zero
    pairs = seen["transformer.wpe"]
    onehots = [(F.one_hot(ids, model.config.n_positions), gy) for ids, gy in pairs]
    a, m, g = linear_factors(onehots)
    assert torch.count_nonzero(a - torch.diag(torch.diagonal(a))) == 0
    torch.testing.assert_close(blocks["transformer.wpe.weight"],
                               restricted(torch.kron(a / m, g / n), flat["transformer.wpe.weight"]))
    assert checked == 16 and m < sum(ids.numel() for ids, _ in pairs)  # padding and last positions are not tokens


def test_linear_bias_and_embedding_with_padding_row_equal_rows_of_dense_kron():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4, padding_idx=2), nn.Linear(4, 3)).eval()
    ids = torch.tensor([[1, 2, 2, 5], [2, 7, 7, 7], [10, 3, 1, 2], [4, 4, 9, 0]])
    labels = torch.tensor([0, 1, 2, 1])
    batches = [{"ids": ids[:3], "labels": labels[:3]}, {"ids": ids[3:], "labels": labels[3:]}]

    def task(m, batch):
        return F.cross_entropy(m(batch["ids"]).mean(1), batch["labels"], reduction="none")

    index_set = draw_index_set(track_modules(model).param_shapes, 40, seed=0)
    blocks, factors = kfac_blocks(model, index_set, batches, task)
    flat = dict(zip(index_set.names, index_set.flat_indices))
    seen = record_layers(model, ["0", "1"], batches, task)
    a, m, g = linear_factors(seen["1"])
    torch.testing.assert_close(blocks["1.weight"], restricted(torch.kron(g / 4, a / m), flat["1.weight"]))
    torch.testing.assert_close(blocks["1.bias"], restricted(g / 4, flat["1.bias"]))
    # the padding row has no gradient: its positions are no tokens of A and add nothing to G
    unpadded = [(F.one_hot(x, 11) * (x != 2)[..., None], gy * (x != 2)[..., None]) for x, gy in seen["0"]]
    a, m, g = linear_factors(unpadded)
    assert m == int((ids != 2).sum())
    torch.testing.assert_close(blocks["0.weight"], restricted(torch.kron(a / m, g / 4), flat["0.weight"]))


def test_conv2d_groups_reflect_padding_and_linear_head_equal_rows_of_dense_kron():
    model = tiny_models.small_cnn()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(7, 1, 8, 8, generator=generator), torch.randint(0, 4, (7,), generator=generator)
    batches = [{"pixel_values": images[:4], "labels": labels[:4]}, {"pixel_values": images[4:], "labels": labels[4:]}]

    def task(m, batch):
        return F.cross_entropy(m(batch["pixel_values"]), batch["labels"], reduction="none")

    index_set = draw_index_set(track_modules(model).param_shapes, 500, seed=1)
    blocks, factors = kfac_blocks(model, index_set, batches, task)
    flat = dict(zip(index_set.names, index_set.flat_indices))
    seen = record_layers(model, ["conv1", "conv2", "head"], batches, task)
    for name in ("conv1", "conv2"):
        conv = model.get_submodule(name)
        pad = conv.padding if conv.padding_mode == "zeros" else 0

        def unfold(x):
            if conv.padding_mode != "zeros":
                x = F.pad(x, (1, 1, 1, 1), mode=conv.padding_mode)
            return F.unfold(x, conv.kernel_size, padding=pad, stride=conv.stride).transpose(1, 2)

        a, m, g = linear_factors([(unfold(x), gy.flatten(2).transpose(1, 2)) for x, gy in seen[name]])
        # the dense map [out, in·kh·kw]; a grouped weight entry (r, c) is column group(r)·per_out + c of it
        per_out = conv.in_channels // conv.groups * 9
        rows, cols = np.divmod(flat[f"{name}.weight"], per_out)
        full_cols = rows // (conv.out_channels // conv.groups) * per_out + cols
        dense = torch.kron(g / 7, a / m)
        torch.testing.assert_close(blocks[f"{name}.weight"], restricted(dense, rows * a.shape[0] + full_cols))
        torch.testing.assert_close(blocks[f"{name}.bias"], restricted(g / 7, flat[f"{name}.bias"]))
    a, m, g = linear_factors(seen["head"])
    torch.testing.assert_close(blocks["head.weight"], restricted(torch.kron(g / 7, a / m), flat["head.weight"]))


def test_peft_lora_factors_equal_rows_of_dense_kron():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                        init_lora_weights=False)  # random B, so A's output gradients are not all zero
    model = get_peft_model(tiny_models.llama(), config).eval()
    tracked = track_modules(model)
    index_set = draw_index_set(tracked.param_shapes, 400, seed=4)
    batches = gpt2_batches()
    blocks, factors = kfac_blocks(model, index_set, batches, causal_lm_losses)
    assert factors.gram_fallback == [] and len(blocks) == 8  # lora_A and lora_B of q and v, two layers
    modules = [name.removesuffix(".weight") for name in blocks]
    seen = record_layers(model, modules, batches, causal_lm_losses)
    flat = dict(zip(index_set.names, index_set.flat_indices))
    for module in modules:
        a, m, g = linear_factors(seen[module])
        torch.testing.assert_close(blocks[f"{module}.weight"],
                                   restricted(torch.kron(g / 7, a / m), flat[f"{module}.weight"]))


# --- the curvature: scores against a dense solve of the same matrix, built from the kron factors


def dense_gpt2_curvature(model, index_set, examples, train_grads, gram_share, eigen_corrected=False):
    """{tensor: (1 − β)·K_S + β·Gram_S} from one padded batch of all examples (the factors are
    sums over positions, so batching must not matter) and the Gram of train_grads; eigen_corrected:
    K_S's eigenvectors with the Gram's variances along them (numpy's eigh) in place of K_S."""
    batch = collate(examples, 0)
    n = len(examples)
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    seen = record_layers(model, conv1d + ["transformer.wpe"], [batch], causal_lm_losses)
    kron = {}
    for name in conv1d:
        a, m, g = linear_factors(seen[name])
        kron[f"{name}.weight"], kron[f"{name}.bias"] = torch.kron(a / m, g / n), g / n
    a, m, g = linear_factors([(F.one_hot(ids, model.config.n_positions), gy) for ids, gy in seen["transformer.wpe"]])
    kron["transformer.wpe.weight"] = torch.kron(a / m, g / n)
    grads = torch.from_numpy(train_grads).double()
    blocks = {}
    for name, flat, part in zip(index_set.names, index_set.flat_indices, index_set.slices().values()):
        gram = grads[:, part].T @ grads[:, part] / n
        kfac = restricted(kron[name], flat) if name in kron else gram  # the tied wte: its Gram
        if eigen_corrected and name in kron:
            _, u = np.linalg.eigh(kfac.numpy())
            kfac = torch.from_numpy(u @ np.diag(np.diag(u.T @ gram.numpy() @ u)) @ u.T)
        blocks[name] = (1 - gram_share) * kfac + gram_share * gram
    return blocks


@pytest.mark.parametrize("method,mix,damping,blocks", [
    ("kfac", None, "auto", "layer"), ("kfac_mix", None, "auto", "layer"),
    ("kfac_mix", 0.2, 1e-3, "layer"), ("kfac", None, "auto", "full"), ("kfac_mix", 0.7, "auto", "full"),
    ("ekfac", None, "auto", "layer"), ("ekfac", None, "auto", "full")])
def test_scores_equal_a_dense_solve_of_the_kronecker_curvature(method, mix, damping, blocks):
    model = tiny_models.gpt2()
    train, queries = tiny_models.token_examples((5, 9, 3, 7, 6, 4, 8)), tiny_models.token_examples((6, 4, 7), seed=2)
    hessian = {"method": method, "damping": damping, "blocks": blocks, **({"mix": mix} if mix is not None else {})}
    result = distinf.attribute(model, train, queries, batch_size=3,
                               config={"compression": {"k": 600, "seed": 2}, "hessian": hessian,
                                       "scoring": {"normalize": "none"}})
    index_set = draw_index_set(track_modules(model).param_shapes, 600, seed=2)
    beta = {"kfac": 0.0, "ekfac": 0.0, "kfac_mix": 0.5 if mix is None else mix}[method]
    per_tensor = dense_gpt2_curvature(model, index_set, train, result.train_grads, beta, method == "ekfac")
    k = index_set.k
    h = torch.zeros(k, k, dtype=torch.float64)
    for name, part in index_set.slices().items():
        h[part, part] = per_tensor[name]
    grads = torch.from_numpy(result.train_grads).double()
    if blocks == "full":  # across tensors the Kronecker part is zero, the Gram's share is not
        within = torch.block_diag(*[torch.ones(p.stop - p.start, p.stop - p.start) for p in index_set.slices().values()])
        h += beta * (grads.T @ grads / len(train)) * (1 - within)
    parts = list(index_set.slices().values()) if blocks == "layer" else [slice(0, k)]
    lambdas = []
    # distinf's rule for a block whose curvature is float rounding of zero (ekfac of a tensor no
    # example moves: its Gram is ~0, so is every variance along K_S's eigenvectors): λ = 1.
    zero = zero_blocks([float(torch.trace(h[p, p])) * len(train) for p in parts], len(train), parts)
    for i, part in enumerate(parts):
        size = part.stop - part.start
        lam = AUTO_DAMPING_SCALE * float(torch.trace(h[part, part])) / size if damping == "auto" else damping
        lam = 1.0 if damping == "auto" and i in zero else lam
        h[part, part] += lam * torch.eye(size, dtype=torch.float64)
        lambdas.append(lam)
    np.testing.assert_allclose(result.damping, lambdas, rtol=1e-5)
    queries_g = torch.from_numpy(result.query_grads).double()
    scores = (queries_g @ torch.linalg.solve(h, grads.T)).numpy()
    np.testing.assert_allclose(result.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    self_inf = torch.einsum("ik,ki->i", grads, torch.linalg.solve(h, grads.T)).numpy()
    np.testing.assert_allclose(result.self_influence, self_inf, rtol=1e-4)
    gauss_newton = distinf.attribute(model, train, queries, batch_size=3, config={"compression": {"k": 600, "seed": 2}})
    assert not np.allclose(result.scores, gauss_newton.scores, rtol=1e-2)  # a different curvature indeed


# --- the normalisation: on independent inputs and output gradients K_S converges to the Gram


@pytest.mark.parametrize("positions", [1, 4])
def test_on_independent_inputs_and_output_gradients_kfac_converges_to_the_gram(positions):
    """y = W x on `positions` tokens, loss_n = Σ_t v_ntᵀ y_nt: g_n = Σ_t v_nt ⊗ x_nt with x, v independent,
    zero-mean. E[Gram] = T·E[vvᵀ] ⊗ E[xxᵀ] = E[K] under the per-token A and per-example G, so
    ‖K_S − Gram_S‖ shrinks like 1/√n; a per-example A (the "reduce" scale) would be off by T."""
    model = nn.Linear(6, 5, bias=False)
    index_set = draw_index_set(track_modules(model).param_shapes, 14, seed=0)
    scales_in, scales_out = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 3.0]), torch.tensor([2.0, 1.0, 1.0, 0.5, 1.5])

    def task(m, batch):
        return (m(batch["x"]) * batch["v"]).sum((1, 2))

    errors = []
    for n in (100, 10_000):
        generator = torch.Generator().manual_seed(n)
        x = torch.randn(n, positions, 6, generator=generator) * scales_in
        v = torch.randn(n, positions, 5, generator=generator) * scales_out
        tracked = track_modules(model)
        factors = FactorSums(tracked, index_set)
        with GradientCapture(model, tracked, index_set, factors=factors) as capture:
            grads = torch.cat([capture.batch({"x": x[i : i + 1000], "v": v[i : i + 1000]}, task)[0]
                               for i in range(0, n, 1000)]).double()
        gram = grads.T @ grads / n
        kfac = factors.tensors["weight"].block_sum(n) / n
        errors.append(float(torch.linalg.norm(kfac - gram) / torch.linalg.norm(gram)))
    assert errors[1] < 0.05 and errors[1] < errors[0] / 3, errors


def test_the_job_runs_kfac_with_dropout_only_and_mix_needs_kfac_mix():
    job = {"model": {"path": "m"}, "data": {"train": {"path": "t.parquet"}, "queries": {"path": "q.parquet"}}}
    for method in ("kfac", "kfac_mix"):
        assert parse_config({**job, "hessian": {"method": method}}, JobConfig).hessian.method == method
        with pytest.raises(ConfigError, match=f"hessian.method: {method} needs compression.method: dropout"):
            parse_config({**job, "hessian": {"method": method}, "compression": {"method": "gaussian"}}, JobConfig)
    with pytest.raises(ConfigError, match="hessian: mix is only used with method: kfac_mix"):
        parse_config({"hessian": {"method": "kfac", "mix": 0.3}}, distinf.config.AttributionConfig)


class _Masked:
    """Hands FactorSums.add a fixed row mask, as a worker's step does for its padding slots."""

    def __init__(self, sums, rows):
        self.sums, self.rows = sums, rows

    def add(self, use, kept, grad_output):
        self.sums.add(use, kept, grad_output, rows=self.rows)

    def add_examples(self, n):
        self.sums.add_examples(int(self.rows.sum()))


def _filled(model, index_set, batches, factors_of):
    tracked = track_modules(model)
    sums = FactorSums(tracked, index_set)
    with GradientCapture(model, tracked, index_set) as capture:
        for i, batch in enumerate(batches):
            capture.factors = factors_of(sums, i)
            capture.batch(batch, causal_lm_losses)
    return sums


def _assert_same_sums(got, want):
    assert got.count == want.count and list(got.tensors) == list(want.tensors)
    for name, f in want.tensors.items():  # float32 forwards of other padded lengths: agree to rounding
        for field in ("input_sum", "output_sum"):
            expected = getattr(f, field)
            torch.testing.assert_close(getattr(got.tensors[name], field), expected, rtol=1e-5,
                                       atol=1e-6 * float(expected.abs().max()))
        assert got.tensors[name].tokens == f.tokens


def test_a_row_mask_sums_only_the_unmasked_rows():
    """GPT-2 (Conv1D, biases, position embedding): the factor sums of batches with some rows masked
    out equal those of batches of only the unmasked rows (padded to other lengths), and a worker's
    ChunkFactors, slot by slot with rows left out after the batch, equals both."""
    from distinf.runtime.chunk_factors import (ChunkFactors, add_factor_sums, factor_arrays, plans_only,
                                               read_factor_sums)

    torch.manual_seed(0)
    model = tiny_models.gpt2()
    index_set = draw_index_set(track_modules(model).param_shapes, 3000, seed=3)
    examples = tiny_models.token_examples((5, 9, 3, 7, 6, 4, 8))
    keep = [[True, False, True, True], [False, True, True]]  # batches of 4 and 3
    batches = [collate(examples[:4], 0), collate(examples[4:], 0)]
    masked = _filled(model, index_set, batches, lambda sums, i: _Masked(sums, torch.tensor(keep[i])))
    kept = [e for e, k in zip(examples, keep[0] + keep[1]) if k]
    only = _filled(model, index_set, [collate(kept[:2], 0), collate(kept[2:], 0)], lambda sums, i: sums)
    assert only.count == 5 and masked.tensors["transformer.h.0.attn.c_attn.weight"].tokens > 0
    _assert_same_sums(masked, only)

    # The worker's path: slot 1 of batch 0 a padding slot, slot 0 of batch 1 rejected after it ran.
    for per_row in (True, False):
        template = plans_only(FactorSums(track_modules(model), index_set))  # as the worker keeps it
        assert all(f.input_sum.is_meta and f.output_sum.is_meta for f in template.tensors.values())
        chunk = ChunkFactors(template, per_row=per_row)
        tracked = track_modules(model)
        with GradientCapture(model, tracked, index_set, factors=chunk) as capture:
            chunk.start_step([True, False, True, True])
            capture.batch(batches[0], causal_lm_losses)
            chunk.commit_step([0, 2, 3])
            chunk.start_step([per_row is False, True, True])  # without per_row no row is left out afterwards
            capture.batch(batches[1], causal_lm_losses)
            chunk.commit_step([1, 2] if per_row else [0, 1, 2])
        if per_row:
            _assert_same_sums(chunk.chunk, only)
            # committed as a file's arrays and read back over the stored index set, two halves add up
            table = index_set.to_table()
            twice = add_factor_sums(read_factor_sums(factor_arrays(chunk.chunk), table, "a"),
                                    read_factor_sums(factor_arrays(chunk.chunk), table, "b"), "b")
            assert twice.count == 10 and twice.gram_fallback == only.gram_fallback
            torch.testing.assert_close(twice.tensors["transformer.wpe.weight"].output_sum,
                                       2 * only.tensors["transformer.wpe.weight"].output_sum)
        else:  # the padding slot alone left out
            padded = [torch.tensor([True, False, True, True]), torch.ones(3, dtype=torch.bool)]
            _assert_same_sums(chunk.chunk, _filled(model, index_set, batches, lambda sums, i: _Masked(sums, padded[i])))


def test_kfac_needs_the_dropout_compression():
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="need compression.method: dropout"):
        distinf.attribute(model, [{"x": torch.randn(4)}], [{"x": torch.randn(4)}], task=lambda m, b: m(b["x"]).sum(1),
                          config={"compression": {"method": "gaussian", "k": 6}, "hessian": {"method": "kfac"}})


def test_a_chunk_commits_its_factor_sums_and_counts_as_done_only_with_them_intact(tmp_path):
    """The ledger's side of kfac in the job: the factor file is recorded with its sha256, a part
    whose factors are missing or changed is computed again, and an appended run's stored chunk
    (listed in the manifest without them) finds its factors through its ledger record."""
    from distinf.runtime.chunk_factors import factor_arrays, read_factor_sums
    from distinf.runtime.ledger import check_record, commit_chunk
    from distinf.runtime.reduce_score import factor_files
    from distinf.runtime.run_dir import RunDir
    from distinf.store import IntegrityError, read_arrays
    from distinf.tables import gradient_table

    torch.manual_seed(0)
    model = tiny_models.gpt2()
    index_set = draw_index_set(track_modules(model).param_shapes, 300, seed=3)
    _, sums = kfac_blocks(model, index_set, gpt2_batches()[:1], causal_lm_losses)
    table = gradient_table(["a", "b", "c"], np.zeros(3), np.zeros((3, index_set.k)))
    ids = ["a", "b", "c"]
    record = commit_chunk(tmp_path, "train", 1, 4, ids, table, [], factors=factor_arrays(sums))
    assert record["factors"]["file"] == "factors/train/part-00001-00004.safetensors"
    assert check_record(tmp_path, "train", 1, 4, ids, with_factors=True) == record
    stored = read_factor_sums(read_arrays(tmp_path / record["factors"]["file"], record["factors"]["sha256"]),
                              index_set.to_table(), "here")
    _assert_same_sums(stored, sums)

    manifest_entry = {key: record[key] for key in ("file", "chunk", "rank", "rows", "sha256")}
    assert factor_files(RunDir.at(tmp_path), [manifest_entry]) == \
        [(str(tmp_path / record["factors"]["file"]), record["factors"]["sha256"])]

    plain = commit_chunk(tmp_path, "train", 0, 4, ids, table, [])  # committed by a gauss_newton run
    assert "factors" not in plain and check_record(tmp_path, "train", 0, 4, ids, with_factors=True) is None
    with pytest.raises(IntegrityError, match="part-00000-00004.parquet'.*no Kronecker factor sums"):
        factor_files(RunDir.at(tmp_path), [plain])
    (tmp_path / record["factors"]["file"]).write_bytes(b"changed")
    assert check_record(tmp_path, "train", 1, 4, ids, with_factors=True) is None
