"""The setup check of distinf.runtime.weight_check on a model held whole (zero_stage 0): it passes
on what transformers loads, and names the parameter when a dtype or a value is not the checkpoint's."""

import pytest
import torch

import tiny_models
from distinf.config import ModelConfig
from distinf.models import ModelError, load_model
from distinf.runtime.weight_check import HeldRange, verify_loaded_weights, window_start


@pytest.fixture
def model_dir(tmp_path):
    tiny_models.gpt2().save_pretrained(tmp_path)
    return tmp_path


def test_a_model_loaded_as_asked_passes_and_every_parameter_is_compared(model_dir):
    cfg = ModelConfig(path=str(model_dir), task="causal_lm")
    model = load_model(cfg)
    report = verify_loaded_weights(model, cfg)
    assert report["dtype"] == "float32"
    assert report["params_compared"] == len(list(model.parameters()))
    assert report["elements_compared"] == sum(min(64, p.numel()) for p in model.parameters())


def test_a_bfloat16_checkpoint_loaded_as_float32_passes(tmp_path):
    tiny_models.gpt2().to(torch.bfloat16).save_pretrained(tmp_path)
    cfg = ModelConfig(path=str(tmp_path), task="causal_lm", dtype="float32")
    verify_loaded_weights(load_model(cfg), cfg)


def test_a_parameter_in_another_dtype_is_named(model_dir):
    cfg = ModelConfig(path=str(model_dir), task="causal_lm")
    model = load_model(cfg)
    model.transformer.h[0].ln_1.to(torch.bfloat16)
    with pytest.raises(ModelError, match=r"2 parameter\(s\) .*transformer.h.0.ln_1.weight \(bfloat16\)"):
        verify_loaded_weights(model, cfg)


def test_a_value_that_differs_from_the_checkpoint_is_named(model_dir):
    cfg = ModelConfig(path=str(model_dir), task="causal_lm")
    model = load_model(cfg)
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.bias.add_(1e-6)  # one ulp-sized change is enough
    with pytest.raises(ModelError, match="parameter 'transformer.h.1.attn.c_proj.bias' differs from checkpoint"):
        verify_loaded_weights(model, cfg)


def test_the_window_lies_inside_the_held_range_and_spreads_over_it():
    held = HeldRange(1000, 5000, torch.empty(4000))
    starts = {window_start(f"layer{i}.weight", held, 64) for i in range(200)}
    assert all(1000 <= s <= 5000 - 64 for s in starts)
    assert max(starts) - min(starts) > 3000  # not always the front of the partition
    assert window_start("w", HeldRange(0, 10, torch.empty(10)), 10) == 0
