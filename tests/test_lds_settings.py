"""The fourth and fifth LDS settings (benchmarks/quality/lds.py `lora`, `untracked`) and the optimizer
state the cross-source benchmark saves, each against an independent computation: the modules of a
rebuilt model, Hugging Face's own padding mask, per-example autograd, AdamW's second-moment rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.quality import lds
from benchmarks.quality.lds_models import build


def test_untracked_setting_attributes_and_exports_only_the_linear_layers(tmp_path):
    common = ["--setting", "untracked", "--n-train", "40", "--n-test", "10", "--max-length", "16", "--subsets", "3",
              "--epochs", "1", "--ks", "64", "--work", str(tmp_path / "work")]
    lds.main(common + ["--methods", "dropout:gauss_newton", "--export", str(tmp_path / "export"),
                       "--out", str(tmp_path / "out.md")])
    exported = torch.load(tmp_path / "export" / "untracked.pt")
    model = build(exported["model"], exported["model_kwargs"], exported["state_dict"])
    linear = sorted(f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, nn.Linear)
                    for p, _ in module.named_parameters(recurse=False))
    assert sorted(exported["tracked_parameters"]) == linear
    trained_untracked = {n for n, _ in model.named_parameters()} - set(linear)
    assert {"tokens.weight", "positions.weight", "norm.weight"} <= trained_untracked
    assert exported["x"].dtype == torch.long and int(exported["x"].max()) < exported["model_kwargs"]["vocab"]


def test_lora_classifier_trains_only_adapters_and_head_and_its_mask_is_the_padding_mask():
    torch.manual_seed(0)
    model = build("LoraReviewClassifier", {"model_dir": str(lds.minilm_dir()), "rank": 2, "alpha": 4}).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    ids = torch.tensor([[101, 2023, 2143, 2003, 2307, 102], [101, 6659, 102, 0, 0, 0]])
    keep = ids != 0
    with torch.no_grad():
        reference = model.encoder(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        pooled = (reference * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
        assert torch.allclose(model(ids), model.head(pooled), atol=1e-5)

    # TRAK's per-example gradients (torch.func.vmap) equal autograd one example at a time.
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    labels = torch.tensor([1, 0])

    def loss(w, x, y):
        return F.cross_entropy(torch.func.functional_call(model, w, (x.unsqueeze(0),)), y.unsqueeze(0))

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(weights, ids, labels)
    params = dict(model.named_parameters())
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(ids[i:i + 1]), labels[i:i + 1]).backward()
        for name in trainable:
            assert torch.allclose(batched[name][i], params[name].grad, atol=1e-6), name


@pytest.mark.distributed
def test_fine_tuning_saves_adamws_second_moment_by_parameter_name(tmp_path):
    """One step of AdamW from zero state: exp_avg_sq = (1 − β2) · g², g the clipped batch gradient."""
    import job_fixtures
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from benchmarks.quality import cross_source
    from distinf.config import load_job
    from distinf.core.tasks import causal_lm_losses
    from distinf.batching import collate
    from distinf.inputs import plan_job

    train, queries = cross_source.write_split(tmp_path / "data", seed=0, n_train=1, n_query=1)
    base = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    plan = plan_job(load_job(cross_source.JOB, cross_source.job_overrides(base, train, queries, k=64, seed=0,
                                                                          top_k=3, max_length=16)))
    saved = tmp_path / "adam" / "exp_avg_sq.safetensors"
    cross_source.fine_tune(base, plan.train.examples, plan.pad_token_id, tmp_path / "model", seed=0, epochs=1,
                           lr=1e-3, batch_size=len(plan.train.examples), optimizer_out=saved)
    moments = load_file(saved)

    torch.manual_seed(0)  # fine_tune's seed: the same dropout masks, the same batch order
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    order = torch.randperm(len(plan.train.examples), generator=torch.Generator().manual_seed(0)).tolist()
    causal_lm_losses(model, collate([plan.train.examples[i] for i in order], plan.pad_token_id)).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    named = dict(model.named_parameters())
    assert set(moments) == set(named)
    for name, param in named.items():
        assert torch.allclose(moments[name], 0.001 * param.grad ** 2, rtol=1e-4, atol=1e-12), name
