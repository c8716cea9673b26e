"""Kept gradient entries from capture equal per-example autograd gradients (torch.func) at the same indices.

The reference runs each example alone, unpadded, through torch.func.grad of a loss written here;
capture runs padded batches through distinf.attribute. Agreement therefore also shows that
padding leaks nothing between examples.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.func import functional_call, grad

import distinf
import tiny_models
from distinf.core.adapters import base as adapter_base
from distinf.core.capture import CaptureError, GradientCapture
from distinf.core.index_set import draw_index_set
from distinf.core.tracking import track_modules


def reference_entries(model, example, loss_of, index_table):
    """The kept entries of one example's full gradient, from torch.func.grad."""
    names = list(dict.fromkeys(index_table.column("param").to_pylist()))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(tracked):
        return loss_of(lambda **kw: functional_call(model, {**params, **tracked}, args=(), kwargs=kw), example)

    grads = grad(loss)({name: params[name] for name in names})
    flat = index_table.column("flat_index").to_numpy()
    param_col = np.array(index_table.column("param").to_pylist())
    return torch.cat([grads[name].reshape(-1)[torch.from_numpy(flat[param_col == name])] for name in names])


def causal_lm_loss(call, example):
    ids = example["input_ids"]
    logits = call(input_ids=ids[None], attention_mask=example["attention_mask"][None]).logits[0]
    return F.cross_entropy(logits[:-1], ids[1:])


def classification_loss(call, example):
    logits = call(input_ids=example["input_ids"][None], attention_mask=example["attention_mask"][None]).logits
    return F.cross_entropy(logits, example["labels"][None])


def assert_matches_reference(model, examples, loss_of, task, k=512, batch_size=3):
    result = distinf.attribute(model, examples, examples[:1], task=task, batch_size=batch_size,
                               config={"compression": {"k": k, "seed": 3}})
    reference = torch.stack([reference_entries(model, ex, loss_of, result.index_set) for ex in examples])
    ours = torch.from_numpy(result.train_grads)
    assert ours.shape == reference.shape
    relative = (ours - reference).norm(dim=1) / reference.norm(dim=1)
    assert relative.max() < 1e-5, relative
    assert reference.abs().sum(1).min() > 0  # a vacuous all-zero comparison would prove nothing
    return result


LENGTHS = (5, 9, 3, 12, 7)

# Kept weight entries come from the gather-multiply-sum path or from a dense [N, rows, cols] block
# (chosen per layer by how densely its entries are kept); each test marked with this runs both.
both_product_paths = pytest.mark.parametrize("dense_block_factor", [0, 10**9], ids=["gather", "dense-block"])


@pytest.fixture(autouse=True)
def _product_path(request, monkeypatch):
    if "dense_block_factor" in request.fixturenames:
        monkeypatch.setattr(adapter_base, "_DENSE_BLOCK_FACTOR", request.getfixturevalue("dense_block_factor"))


@both_product_paths
def test_gpt2_conv1d_tied_embedding_matches_torch_func(dense_block_factor):
    model = tiny_models.gpt2()
    result = assert_matches_reference(model, tiny_models.token_examples(LENGTHS), causal_lm_loss, "causal_lm")
    params = set(result.index_set.column("param").to_pylist())
    assert "transformer.h.0.attn.c_attn.weight" in params and "transformer.wte.weight" in params


@both_product_paths
def test_llama_linear_tied_embedding_matches_torch_func(dense_block_factor):
    assert_matches_reference(tiny_models.llama(), tiny_models.token_examples(LENGTHS), causal_lm_loss, "causal_lm")


def test_neox_linear_untied_matches_torch_func():
    assert_matches_reference(tiny_models.neox(), tiny_models.token_examples(LENGTHS), causal_lm_loss, "causal_lm")


def test_bert_classifier_embeddings_and_bias_match_torch_func():
    examples = tiny_models.token_examples(LENGTHS, labels=3)
    assert_matches_reference(tiny_models.bert_classifier(), examples, classification_loss, "sequence_classification")


def test_embedding_only_with_padding_row_matches_torch_func():
    """An nn.Embedding with a padding row whose every entry is kept; padding_idx rows get zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4, padding_idx=2), torch.nn.Linear(4, 3))
    examples = [{"ids": torch.tensor(ids), "labels": torch.tensor(label)}
                for ids, label in [([1, 2, 2, 5], 0), ([2, 7, 7, 7], 1), ([10, 3, 1, 2], 2)]]

    def task(m, batch):
        return F.cross_entropy(m(batch["ids"]).mean(1), batch["labels"], reduction="none")

    result = distinf.attribute(model, examples, examples[:1], task=task, config={"compression": {"k": 10_000}})
    params = dict(model.named_parameters())
    for row, example in enumerate(examples):
        def loss(p):
            out = functional_call(model, p, (example["ids"][None],))
            return F.cross_entropy(out.mean(1), example["labels"][None])
        reference = torch.cat([g.reshape(-1) for g in grad(loss)({n: v.detach() for n, v in params.items()}).values()])
        torch.testing.assert_close(torch.from_numpy(result.train_grads[row]), reference, rtol=1e-5, atol=1e-7)
    assert result.train_grads[:, 2 * 4 : 3 * 4].sum() == 0  # row 2 is padding_idx


@both_product_paths
def test_cnn_conv2d_groups_reflect_padding_matches_vmap_grad(dense_block_factor):
    model = tiny_models.small_cnn()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (6,), generator=generator)
    examples = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)]

    def task(m, batch):
        return F.cross_entropy(m(batch["pixel_values"]), batch["labels"], reduction="none")

    result = distinf.attribute(model, examples, examples[:1], task=task, batch_size=4,
                               config={"compression": {"k": 300, "seed": 1}})
    tracked = {n: p.detach() for n, p in model.named_parameters() if "norm" not in n}
    others = {n: p.detach() for n, p in model.named_parameters() if "norm" in n}
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        out = functional_call(model, {**p, **others, **buffers}, (x[None],))
        return F.cross_entropy(out, y[None])

    full = torch.func.vmap(grad(loss), in_dims=(None, 0, 0))(tracked, images, labels)
    table = result.index_set
    names = np.array(table.column("param").to_pylist())
    flat = table.column("flat_index").to_numpy()
    reference = torch.cat([full[n].reshape(6, -1)[:, torch.from_numpy(flat[names == n])]
                           for n in dict.fromkeys(names.tolist())], dim=1)
    torch.testing.assert_close(torch.from_numpy(result.train_grads), reference, rtol=1e-5, atol=1e-6)
    assert not any("norm" in n for n in names)  # BatchNorm parameters are not tracked
    assert result.tracked_fraction < 1


@both_product_paths
def test_peft_lora_factors_match_torch_func(dense_block_factor):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                        init_lora_weights=False)  # random B, so A's gradients are not all zero
    model = get_peft_model(tiny_models.llama(), config).eval()
    result = assert_matches_reference(model, tiny_models.token_examples(LENGTHS), causal_lm_loss, "causal_lm",
                                      k=200)
    params = set(result.index_set.column("param").to_pylist())
    assert params and all("lora_" in name for name in params)


def test_tracked_fraction_counts_untracked_norms():
    model = tiny_models.gpt2()
    tracked = track_modules(model)
    norms = sum(p.numel() for n, p in model.named_parameters() if ".ln_" in n or n.startswith("transformer.ln_f"))
    total = sum(p.numel() for p in model.parameters())
    assert tracked.tracked_numel == total - norms
    assert math.isclose(tracked.tracked_fraction, (total - norms) / total)


def test_excluding_the_output_layer_keeps_the_tied_weight_whole():
    """lm_head shares wte's weight: excluding lm_head by pattern must not drop its use of wte."""
    model = tiny_models.gpt2()
    tracked = track_modules(model, exclude=["lm_head"])
    hooked = {use.name for use in tracked.uses}
    assert "lm_head" in hooked and "transformer.wte" in hooked


def test_batchnorm_in_train_mode_is_refused():
    model = tiny_models.small_cnn().train()
    tracked = track_modules(model)
    index_set = draw_index_set(tracked.param_shapes, 64)
    batch = {"pixel_values": torch.randn(2, 1, 8, 8), "labels": torch.tensor([0, 1])}
    with GradientCapture(model, tracked, index_set) as capture:
        with pytest.raises(CaptureError, match="'norm'.*train mode"):
            capture.batch(batch, lambda m, b: F.cross_entropy(m(b["pixel_values"]), b["labels"], reduction="none"))


def test_capture_restores_requires_grad_and_train_mode():
    model = tiny_models.gpt2().train()
    model.transformer.wpe.weight.requires_grad_(False)
    distinf.attribute(model, tiny_models.token_examples((4, 6)), tiny_models.token_examples((5,)),
                      config={"compression": {"k": 64}})
    assert model.training
    assert not model.transformer.wpe.weight.requires_grad
    assert model.transformer.wte.weight.requires_grad


def test_capture_run_rows_match_torch_func_whatever_shares_their_batch():
    """The gradient worker's use of the batch loop: uneven batches, a padding slot re-running
    example 0, the longest example padded against others. Each kept row is its example's own."""
    from distinf.batching import collate
    from distinf.core.tasks import causal_lm_losses

    model = tiny_models.llama().eval()
    examples = tiny_models.token_examples(LENGTHS)
    tracked = track_modules(model)
    index_set = draw_index_set(tracked.param_shapes, 256, seed=5)
    steps = [[3, 0], [4, 1, -1], [2]]  # -1: a padding slot, whose row is dropped
    with GradientCapture(model, tracked, index_set) as capture:
        batches = (collate([examples[max(p, 0)] for p in step]) for step in steps)
        rows = {p: g for step, (grads, _) in zip(steps, capture.run(batches, causal_lm_losses, torch.device("cpu")))
                for p, g in zip(step, grads) if p >= 0}
    reference = torch.stack([reference_entries(model, ex, causal_lm_loss, index_set.to_table()) for ex in examples])
    ours = torch.stack([rows[i] for i in range(len(examples))])
    relative = (ours - reference).norm(dim=1) / reference.norm(dim=1)
    assert relative.max() < 1e-5, relative
    assert reference.abs().sum(1).min() > 0
