"""Loss masking for instruction data (prompt/completion and chat messages columns), checked against
torch.func on a real tokenizer (SmolLM2's, with its chat template) and a tiny Llama of its vocabulary.

The reference never uses distinf's masks: it finds the completion tokens by tokenising the prompt
alone (a prefix of the whole), or the assistant tokens by tokenising hand-written ChatML segments
one by one, and takes the mean of -log p(token | tokens before it) over those tokens by indexing,
with gradients from torch.func.grad over functional_call.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import distinf
from distinf.assets import smollm2_dir
from distinf.batching import collate
from distinf.config import ConfigError, DatasetConfig, parse_config
from distinf.core.tasks import causal_lm_losses
from distinf.inputs import DataError, fingerprint, read_dataset, tokenize

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

PAIRS = [
    ("Q: What is two plus two?\nA:", " Four."),
    ("Translate to French: cat\n", "chat"),
    ("Name a colour.", " Blue, like the sky on a clear day."),
    ("", "A completion without any prompt at all."),
]

CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "Fine."},
     {"role": "user", "content": "Thanks"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def read(tmp_path, rows, **columns):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return read_dataset(DatasetConfig(path=str(path), **columns), "train")[0]


def completion_rows():
    return [{"id": f"p{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PAIRS)]


# --- the independent reference ------------------------------------------------------------------


def completion_positions(tokenizer, prompt, completion):
    """(token ids of prompt + completion, the positions of the completion's tokens), from the prompt's
    own tokenisation, which must be a prefix of the whole (true for these texts)."""
    whole = tokenizer(prompt + completion)["input_ids"]
    head = tokenizer(prompt)["input_ids"] if prompt else []
    assert whole[: len(head)] == head
    return whole, list(range(len(head), len(whole)))


def chatml_positions(tokenizer, messages):
    """SmolLM2's ChatML written by hand, segment by segment: the ids and the assistant turns' positions
    (content and its <|im_end|>\\n, as the template writes a turn after the generation prompt)."""
    segments = [] if messages[0]["role"] == "system" else [(SYSTEM, False)]
    for turn in messages:
        if turn["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (turn["content"] + "<|im_end|>\n", True)]
        else:
            segments.append((f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>\n", False))
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(messages, tokenize=False)
    ids, positions = [], []
    for text, assistant in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        if assistant:
            positions += range(len(ids), len(ids) + len(part))
        ids += part
    assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    return ids, positions


def reference(model, ids, positions):
    """(loss, {name: gradient}) of the mean -log p over `positions` (those with a token before them)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    targets = torch.tensor([t for t in positions if t >= 1])
    ids = torch.tensor(ids)[None]

    def loss(p):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids}).logits[0].float()
        logp = torch.log_softmax(logits[targets - 1], dim=-1)
        return -logp[torch.arange(len(targets)), ids[0, targets]].mean()

    return loss(params).item(), grad(loss)(params)


# --- tokenisation --------------------------------------------------------------------------------


def test_prompt_tokens_are_labelled_minus_100_and_the_rest_is_the_completion(tmp_path, tokenizer):
    table = read(tmp_path, completion_rows(), id_column="id", prompt_column="prompt", completion_column="completion")
    assert table.column("text").to_pylist() == [p + c for p, c in PAIRS]
    data = tokenize(table, tokenizer, 64, "causal_lm")
    for example, (prompt, completion) in zip(data.examples, PAIRS):
        ids, positions = completion_positions(tokenizer, prompt, completion)
        assert example["input_ids"].tolist() == ids  # the same tokens as the text prompt + completion
        expected = [t if i in positions else -100 for i, t in enumerate(ids)]
        assert example["labels"].tolist() == expected


def test_assistant_turns_alone_carry_labels(tmp_path, tokenizer):
    rows = [{"id": f"c{i}", "messages": m} for i, m in enumerate(CHATS)]
    data = tokenize(read(tmp_path, rows, id_column="id", messages_column="messages"), tokenizer, 128, "causal_lm")
    for example, messages in zip(data.examples, CHATS):
        ids, positions = chatml_positions(tokenizer, messages)
        assert example["input_ids"].tolist() == ids
        assert example["labels"].tolist() == [t if i in positions else -100 for i, t in enumerate(ids)]


def test_messages_as_json_strings_in_a_csv_read_the_same(tmp_path, tokenizer):
    import csv

    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "messages"])
        for i, m in enumerate(CHATS):
            writer.writerow([f"c{i}", json.dumps(m)])
    from_csv = read_dataset(DatasetConfig(path=str(path), id_column="id", messages_column="messages"), "train")[0]
    rows = [{"id": f"c{i}", "messages": m} for i, m in enumerate(CHATS)]
    from_jsonl = read(tmp_path, rows, id_column="id", messages_column="messages")
    assert fingerprint(tokenize(from_csv, tokenizer, 128, "causal_lm")) == \
        fingerprint(tokenize(from_jsonl, tokenizer, 128, "causal_lm"))


# --- losses and gradients against torch.func ---------------------------------------------------


@pytest.mark.parametrize("mode", ["completion", "messages"])
def test_masked_losses_and_gradients_equal_torch_func_on_the_completion_tokens_alone(tmp_path, tokenizer, model,
                                                                                    mode):
    if mode == "completion":
        rows, columns = completion_rows(), {"prompt_column": "prompt", "completion_column": "completion"}
        expected = [completion_positions(tokenizer, p, c) for p, c in PAIRS]
    else:
        rows, columns = [{"id": f"c{i}", "messages": m} for i, m in enumerate(CHATS)], {"messages_column": "messages"}
        expected = [chatml_positions(tokenizer, m) for m in CHATS]
    data = tokenize(read(tmp_path, rows, id_column="id", **columns), tokenizer, 128, "causal_lm")
    refs = [reference(model, ids, positions) for ids, positions in expected]

    # distinf's batched loss, padded to the longest example
    losses = causal_lm_losses(model, collate(data.examples, pad_token_id=tokenizer.pad_token_id))
    np.testing.assert_allclose(losses.detach().numpy(), [loss for loss, _ in refs], rtol=1e-5)

    # distinf's per-example gradients, every entry of the last layer's MLP kept
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.1.mlp.")]
    result = distinf.attribute(model, data.examples, data.examples[:2], batch_size=3, config={
        "compression": {"k": 10**9, "modules": {"include": [r"model\.layers\.1\.mlp\..*"]}},
        "hessian": {"method": "identity"}, "scoring": {"normalize": "none"}}, pad_token_id=tokenizer.pad_token_id)
    index = result.index_set.to_pydict()
    assert set(index["param"]) == set(names)
    columns_of = np.array(index["flat_index"])
    ref_grads = np.stack([np.concatenate([g[n].reshape(-1).numpy()[columns_of[np.array(index["param"]) == n]]
                                          for n in dict.fromkeys(index["param"])]) for _, g in refs])
    scale = np.abs(ref_grads).max()
    np.testing.assert_allclose(result.train_grads, ref_grads, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(result.train_losses, [loss for loss, _ in refs], rtol=1e-5)
    # identity curvature: the influence is the dot product of the masked gradients
    np.testing.assert_allclose(result.scores, ref_grads[:2] @ ref_grads.T, rtol=1e-3, atol=1e-6 * scale**2)


def test_vmapped_reference_agrees_for_equal_lengths(tokenizer, model):
    """The same reference by vmap over two examples of one length (a check on the check)."""
    ids_a, pos_a = completion_positions(tokenizer, "Q: one?\nA:", " One.")
    ids_b, pos_b = completion_positions(tokenizer, "Q: two?\nA:", " Two.")
    assert len(ids_a) == len(ids_b) and pos_a == pos_b
    params = {n: p.detach() for n, p in model.named_parameters()}
    targets = torch.tensor(pos_a)

    def loss(p, ids):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids[None]}).logits[0]
        logp = torch.log_softmax(logits[targets - 1], dim=-1)
        return -logp[torch.arange(len(targets)), ids[targets]].mean()

    grads = vmap(grad(loss), in_dims=(None, 0))(params, torch.tensor([ids_a, ids_b]))
    for row, (ids, positions) in enumerate([(ids_a, pos_a), (ids_b, pos_b)]):
        _, g = reference(model, ids, positions)
        for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
            torch.testing.assert_close(grads[name][row], g[name], rtol=1e-4, atol=1e-7)


# --- truncation and bad rows ----------------------------------------------------------------------


def test_a_completion_cut_in_part_keeps_the_loss_on_what_is_left(tmp_path, tokenizer, model):
    prompt, completion = PAIRS[2]
    ids, positions = completion_positions(tokenizer, prompt, completion)
    limit = positions[0] + 3  # three completion tokens survive
    data = tokenize(read(tmp_path, completion_rows()[2:3], prompt_column="prompt", completion_column="completion"),
                    tokenizer, limit, "causal_lm")
    assert data.truncated == 1
    example = data.examples[0]
    assert example["input_ids"].tolist() == ids[:limit]
    loss = causal_lm_losses(model, collate([example])).item()
    assert loss == pytest.approx(reference(model, ids[:limit], positions[:3])[0], rel=1e-5)


def test_a_completion_cut_away_entirely_is_a_bad_row(tmp_path, tokenizer):
    rows = completion_rows()
    table = read(tmp_path, rows, id_column="id", prompt_column="prompt", completion_column="completion")
    prompt_tokens = len(tokenizer(PAIRS[0][0])["input_ids"])
    with pytest.raises(DataError, match=r"data.train row 0 \(id 'p0'\): no token of the completion is left .*"
                                        r"cut away by data.max_length"):
        tokenize(table, tokenizer, prompt_tokens, "causal_lm")
    data = tokenize(table, tokenizer, prompt_tokens, "causal_lm", on_bad_row="skip")
    rejected = {r.example_id: r.reason for r in data.rejected}
    assert "p0" in rejected and "cut away by data.max_length" in rejected["p0"]
    assert "p3" in data.ids  # no prompt: its completion is what is kept


def test_bad_instruction_rows_are_named_or_skipped(tmp_path, tokenizer):
    rows = [{"id": "a", "prompt": "Say:", "completion": " yes"}, {"id": "b", "prompt": "Say:", "completion": "  "},
            {"id": "c", "prompt": None, "completion": " no"}]
    with pytest.raises(DataError, match=r"row 2 \(id 'c'\): the prompt is missing"):
        read(tmp_path, rows, id_column="id", prompt_column="prompt", completion_column="completion")
    path = tmp_path / "data.jsonl"
    table, rejected = read_dataset(DatasetConfig(path=str(path), id_column="id", prompt_column="prompt",
                                                 completion_column="completion"), "train", "skip")
    assert table.column("example_id").to_pylist() == ["a"]
    assert [(r.row, r.reason) for r in rejected] == [(1, "the completion is empty"), (2, "the prompt is missing")]

    chats = [{"id": "x", "messages": [{"role": "user", "content": "hi"}]},
             {"id": "y", "messages": CHATS[0]}, {"id": "z", "messages": [{"role": "user"}]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in chats), encoding="utf-8")
    cfg = DatasetConfig(path=str(path), id_column="id", messages_column="messages")
    with pytest.raises(DataError, match=r"row 0 \(id 'x'\): the messages have no assistant turn"):
        read_dataset(cfg, "train")
    table, rejected = read_dataset(cfg, "train", "skip")
    assert table.column("example_id").to_pylist() == ["y"]
    assert [r.example_id for r in rejected] == ["x", "z"] and "role, content" in rejected[1].reason


def test_a_tokenizer_without_a_chat_template_is_named(tmp_path, tokenizer):
    rows = [{"id": "c0", "messages": CHATS[0]}]
    table = read(tmp_path, rows, id_column="id", messages_column="messages")
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(DataError, match="data.train.messages_column: the tokenizer of model.path has no chat"):
            tokenize(table, tokenizer, 64, "causal_lm")
    finally:
        tokenizer.chat_template = template


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("section, message", [
    ({"prompt_column": "p"}, "prompt_column needs completion_column"),
    ({"completion_column": "c"}, "completion_column needs prompt_column"),
    ({"messages_column": "m", "prompt_column": "p", "completion_column": "c"},
     "messages_column cannot be combined with prompt_column/completion_column"),
    ({"messages_column": "m", "text_column": "body"}, "text_column is not used with messages_column"),
    ({"prompt_column": "p", "completion_column": "c", "label_column": "y"}, "label_column is not used"),
])
def test_unknown_combinations_are_refused_naming_the_keys(section, message):
    job = {"model": {"path": "m"}, "data": {"train": {"path": "t.jsonl", **section}, "queries": {"path": "q.jsonl"}}}
    with pytest.raises(ConfigError) as info:
        parse_config(job)
    assert "data.train" in str(info.value) and message in str(info.value)


def test_masking_needs_a_causal_lm():
    job = {"model": {"path": "m", "task": "sequence_classification"},
           "data": {"train": {"path": "t.jsonl"}, "queries": {"path": "q.jsonl", "messages_column": "m"}}}
    with pytest.raises(ConfigError, match="data.queries.messages_column: masks the loss of a causal_lm"):
        parse_config(job)
