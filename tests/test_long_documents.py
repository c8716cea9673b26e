"""Activation checkpointing and the attention implementations under the capture hooks: kept
entries still equal per-example torch.func gradients (test_adapters' reference)."""

import pytest
import torch

import distinf
import tiny_models
from distinf.core.checkpointing import CheckpointedBlocks, repeated_blocks
from test_adapters import LENGTHS, assert_matches_reference, causal_lm_loss, reference_entries

ARCHS = {"gpt2": tiny_models.gpt2, "llama": tiny_models.llama, "neox": tiny_models.neox}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpointed_blocks_give_the_torch_func_gradients_and_really_recompute(arch):
    model = ARCHS[arch]()
    examples = tiny_models.token_examples(LENGTHS)
    plain = distinf.attribute(model, examples, examples[:1], batch_size=3, config={"compression": {"k": 512, "seed": 3}})
    blocks = repeated_blocks(model)
    assert len(blocks) == 2  # the two decoder layers, nothing inside them
    calls = []
    counters = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks]
    inner = [next(iter(b.children())) for b in blocks]
    inner_calls = []
    counters += [m.register_forward_pre_hook(lambda *_: inner_calls.append(1)) for m in inner]
    with CheckpointedBlocks(model):
        result = distinf.attribute(model, examples, examples[:1], batch_size=3,
                                   config={"compression": {"k": 512, "seed": 3}})
    for handle in counters:
        handle.remove()
    assert len(inner_calls) == 2 * len(calls) > 0  # each block's insides ran twice: forward and recompute
    assert "forward" not in vars(blocks[0]) and model.config.use_cache  # the model is left as it was
    reference = torch.stack([reference_entries(model, ex, causal_lm_loss, result.index_set) for ex in examples])
    ours = torch.from_numpy(result.train_grads)
    assert ((ours - reference).norm(dim=1) / reference.norm(dim=1)).max() < 1e-5
    torch.testing.assert_close(ours, torch.from_numpy(plain.train_grads), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_per_example_gradients_are_exact_under_each_attention_implementation(arch, attention):
    model = ARCHS[arch]()
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    assert_matches_reference(model, tiny_models.token_examples(LENGTHS), causal_lm_loss, "causal_lm")
