"""benchmarks/quality/retraining_image.py and retraining_language.py at a tiny size, on synthetic data.

What is checked against an independent computation: the IDX reader against a file written by
hand with struct; the top-x% choice against a sort; the identity-hessian ranking against
torch.func per-example gradients at the index set's entries; the language half's fixed-step batch
order against whole passes over the set, its cached frozen outputs and adapter against the Hugging
Face model's own logits and distinf's causal-LM loss.
The image half's whole command then runs end to end on synthetic IDX files.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

import tiny_models
from benchmarks.quality import retraining_image as image
from benchmarks.quality import retraining_language as language
from distinf.core.tasks import causal_lm_losses


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder: Path, n_train: int = 80, n_test: int = 30) -> Path:
    """Fashion-MNIST-shaped files: 10 classes, each a noisy bright square in its own place."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + 10 * row : 12 + 10 * row, 2 + 5 * col : 6 + 5 * col] += 180
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def test_read_idx_returns_what_a_hand_written_file_holds(tmp_path):
    array = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 251
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(image.read_idx(tmp_path / "a.gz"), array)
    write_idx(tmp_path / "labels.gz", np.array([9, 0, 3]))
    assert image.read_idx(tmp_path / "labels.gz").tolist() == [9, 0, 3]


def test_removal_sets_are_the_highest_scores_and_a_random_set_of_equal_size():
    scores = np.random.default_rng(1).normal(size=200)
    top, rand = image.removal_sets(scores, 0.1, np.random.default_rng(2))
    assert len(top) == len(rand) == 20
    assert set(top) == set(np.argsort(scores)[-20:])
    assert len(set(rand)) == 20 and rand.min() >= 0 and rand.max() < 200
    kept = image.kept(200, top).numpy()
    assert len(kept) == 180 and not set(kept) & set(top)


def test_training_is_reproducible_from_the_same_init_and_seed(tmp_path):
    x, y, _, _ = image.data_for_seed(0, 40, 10, fake_fashion_mnist(tmp_path))
    init = image.SmallCNN().state_dict()
    first, second = (image.train(init, x, y, seed=3, epochs=1, batch_size=16, lr=1e-3) for _ in range(2))
    other = image.train(init, x, y, seed=4, epochs=1, batch_size=16, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.head.weight, other.head.weight)


def test_identity_ranking_equals_dot_products_of_torch_func_gradients(tmp_path):
    import distinf

    x, y, tx, ty = image.data_for_seed(0, 24, 6, fake_fashion_mnist(tmp_path))
    torch.manual_seed(0)
    model = image.SmallCNN().eval()
    res = distinf.attribute(model, [{"pixel_values": x[i], "labels": y[i]} for i in range(len(x))],
                            [{"pixel_values": tx[i], "labels": ty[i]} for i in range(len(tx))],
                            task=image.per_example_losses, config={"compression": {"k": 512}})

    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    def selected(xs, ys):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
        columns = [grads[name].flatten(1)[:, index] for name, index in
                   zip(res.index_set.column("param").to_pylist(), res.index_set.column("flat_index").to_pylist())]
        return torch.stack(columns, 1).double()

    expected = (selected(x, y) @ selected(tx, ty).mean(0)).numpy()
    got = image.rankings("dropout", res)["dropout, identity hessian"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(image.rankings("dropout", res)["dropout"], res.scores.mean(0))


def test_image_benchmark_runs_end_to_end_and_writes_its_table(tmp_path):
    out = tmp_path / "section.md"
    assert image.main(["--seeds", "0", "--n-train", "40", "--n-test", "10", "--epochs", "1",
                       "--batch-size", "20", "--k", "256", "--fractions", "0.1",
                       "--data", str(fake_fashion_mnist(tmp_path / "data")), "--out", str(out),
                       "--threads", str(torch.get_num_threads())]) == 0
    text = out.read_text()
    for row in ("| 10% random |", "| 10% top by dropout |", "| 10% top by dropout, identity hessian |",
                "| nothing, retrained with another data order |"):
        assert row in text
    assert "nan" not in text


@pytest.fixture(scope="module")
def tiny_language_cache():
    model = tiny_models.llama(0)
    ids = torch.randint(1, tiny_models.VOCAB, (30, 12), generator=torch.Generator().manual_seed(0))
    hidden = language.frozen_hidden_states(model, ids, batch_size=7)
    return model, {"input_ids": ids, "hidden": hidden, "base_weight": model.lm_head.weight.detach().clone()}


def test_cached_hidden_states_and_untrained_adapter_give_the_full_models_logits_and_loss(tiny_language_cache):
    model, cache = tiny_language_cache
    adapter = language.OutputLoRA(cache["base_weight"], rank=4, alpha=8.0)
    with torch.no_grad():
        logits = model(input_ids=cache["input_ids"]).logits
        expected_losses = causal_lm_losses(model, {"input_ids": cache["input_ids"],
                                                   "attention_mask": torch.ones_like(cache["input_ids"])})
        torch.testing.assert_close(adapter(cache["hidden"]), logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(language.per_sequence_losses(adapter, cache), expected_losses,
                                   atol=1e-4, rtol=1e-4)
    assert [name for name, _ in adapter.named_parameters()] == ["lora_A.weight", "lora_B.weight"]


def test_epochs_schedule_scales_steps_with_the_set_and_steps_schedule_does_not():
    by_epochs = language.argparse.Namespace(epochs=2.0, steps=30, batch_size=4)
    by_steps = language.argparse.Namespace(epochs=None, steps=30, batch_size=4)
    assert [language.steps_for(n, by_epochs) for n in (50, 51, 1000)] == [25, 26, 500]
    assert [language.steps_for(n, by_steps) for n in (50, 1000)] == [30, 30]


def test_batch_order_gives_every_set_the_same_steps_in_whole_passes():
    for index in (torch.tensor([7, 3, 9]), torch.arange(10, 50)):
        batches = language.batch_order(index, steps=5, batch_size=4, order_seed=1)
        assert [len(b) for b in batches] == [4] * 5
        stream = torch.cat(batches).tolist()
        n = len(index)
        for start in range(0, len(stream) - n + 1, n):  # each complete pass is a permutation of the set
            assert sorted(stream[start : start + n]) == sorted(index.tolist())
    assert torch.equal(torch.cat(language.batch_order(torch.arange(9), 4, 2, 0)),
                       torch.cat(language.batch_order(torch.arange(9), 4, 2, 0)))


def test_coupled_order_keeps_shared_sequences_in_the_same_relative_order():
    universe = torch.arange(100, 140)
    subsets = [universe[universe % 3 != 0], universe[universe % 5 != 0], universe]
    streams = [torch.cat(language.batch_order(index, steps=12, batch_size=4, order_seed=3, universe=universe))
               for index in subsets]
    for index, stream in zip(subsets, streams):
        assert sorted(stream[: len(index)].tolist()) == sorted(index.tolist())  # the first pass: the set once
    shared = set(subsets[0].tolist()) & set(subsets[1].tolist())
    first_pass = [[i for i in stream[: len(index)].tolist() if i in shared] for index, stream in zip(subsets, streams)]
    assert first_pass[0] == first_pass[1] == first_pass[2]
    # The full set's order is the uncoupled one, so full fine-tunes are the same under either order.
    assert torch.equal(streams[2], torch.cat(language.batch_order(universe, steps=12, batch_size=4, order_seed=3)))
    independent = [torch.cat(language.batch_order(index, steps=12, batch_size=4, order_seed=3))[: len(index)]
                   for index in subsets[:2]]
    assert [i for i in independent[0].tolist() if i in shared] != [i for i in independent[1].tolist() if i in shared]


def language_args(**overrides):
    settings = dict(n_train=24, n_test=6, rank=4, alpha=8.0, steps=6, epochs=None, batch_size=4, lr=1e-2,
                    weight_decay=0.01, k=128, fractions=[0.25, 0.5], protocol="keep", order="independent",
                    random_draws=1, seeds=[0])
    return language.argparse.Namespace(**{**settings, **overrides})


def test_language_seed_reuses_a_saved_ranking_and_full_fine_tunes(tiny_language_cache, monkeypatch):
    _, cache = tiny_language_cache
    args = language_args(protocol="remove", order="coupled")
    first, score_mean = language.run_seed(0, cache, args)
    trained_on = []
    fine_tune = language.fine_tune
    monkeypatch.setattr(language, "fine_tune", lambda cache, index, *rest, **kw: trained_on.append(index) or
                        fine_tune(cache, index, *rest, **kw))
    monkeypatch.setattr(language.distinf, "attribute", None)  # reuse must not attribute again
    again, same_ranking = language.run_seed(0, cache, args, reused=(first, score_mean))
    assert same_ranking is score_mean
    assert [len(index) for index in trained_on] == [18, 18, 12, 12]  # only the arms, no full fine-tune
    assert again == pytest.approx(first, rel=1e-6)  # the arms are retrained and agree
    with pytest.raises(SystemExit, match="base perplexity"):
        language.run_seed(1, cache, args, reused=(first, score_mean))  # another split


def test_language_seed_draws_several_random_sets_and_tables_their_spread(tiny_language_cache):
    _, cache = tiny_language_cache
    args = language_args(protocol="remove", fractions=[0.25], random_draws=3)
    result, score_mean = language.run_seed(0, cache, args)
    draws = [result[name] for name in ("random 25%", "random 25% (draw 2)", "random 25% (draw 3)")]
    assert len(set(draws)) == 3  # three different sets left out
    row = next(line for line in language.table([result], args) if "3 draws (seed 0)" in line)
    assert f"top − their mean {result['top 25%'] - np.mean(draws):+.2f}" in row


@pytest.mark.parametrize("protocol", ["keep", "remove"])
def test_language_seed_fine_tunes_and_ranks_on_the_cache(tiny_language_cache, protocol, monkeypatch):
    _, cache = tiny_language_cache
    args = language_args(protocol=protocol)
    trained_on = []
    fine_tune = language.fine_tune
    monkeypatch.setattr(language, "fine_tune", lambda cache, index, *rest, **kw: trained_on.append(index) or
                        fine_tune(cache, index, *rest, **kw))
    result, score_mean = language.run_seed(0, cache, args)
    assert score_mean.shape == (24,) and np.isfinite(score_mean).all()
    expected = {"base model (no fine-tuning)", "fine-tuned on all", "fine-tuned on all, other data order",
                "attribution seconds", "top 25%", "random 25%", "top 50%", "random 50%"}
    assert set(result) == expected
    assert all(np.isfinite(v) and v > 0 for v in result.values())
    # Fine-tuning moved the adapter away from the base model (B starts at zero).
    assert result["fine-tuned on all"] != pytest.approx(result["base model (no fine-tuning)"], rel=1e-6)
    train = set(trained_on[0].tolist())
    assert len(train) == 24 and set(trained_on[1].tolist()) == train
    sizes = [len(index) for index in trained_on[2:]]  # top 25%, random 25%, top 50%, random 50%
    assert sizes == ([6, 6, 12, 12] if protocol == "keep" else [18, 18, 12, 12])
    for index in trained_on[2:]:
        assert set(index.tolist()) <= train
    label = "" if protocol == "keep" else "all but "
    assert f"| {label}top 50% by dropout influence |" in "\n".join(language.table([result, result], args))


def test_schedule_check_reports_validation_perplexity_every_half_epoch(tiny_language_cache, capsys):
    _, cache = tiny_language_cache
    args = language.argparse.Namespace(n_train=20, n_test=6, validate=4, rank=4, alpha=8.0, batch_size=4,
                                       lr=1e-2, weight_decay=0.01)
    language.validate_schedule(cache, args, max_epochs=1.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("base model: validation perplexity")
    assert [line.split(":")[0] for line in lines[1:]] == ["lr 0.01, 0.5 epochs", "lr 0.01, 1 epochs"]
