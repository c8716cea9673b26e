"""Small, seeded models of each architecture the adapters must handle, and padded examples."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

VOCAB = 97


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama(seed: int = 0, tied: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def neox(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(config).eval()


def bert_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


class SmallCNN(nn.Module):
    """Conv2d with stride, padding, groups and a reflect-padded layer, then a Linear head."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, stride=1, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.head = nn.Linear(8 * 4 * 4, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv1(pixel_values)))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN()
    model.norm.running_mean.normal_()
    model.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def token_examples(lengths, seed: int = 1, labels: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Examples of different lengths (so batches are padded); ids avoid the pad id 0."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        example = {"input_ids": torch.randint(1, VOCAB, (length,), generator=generator),
                   "attention_mask": torch.ones(length, dtype=torch.long)}
        if labels:
            example["labels"] = torch.randint(0, labels, (), generator=generator)
        examples.append(example)
    return examples
