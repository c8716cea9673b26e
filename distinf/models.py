"""Loading the job's model and tokenizer from a local folder: never a hub, safetensors by default."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distinf.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    pass


def check_model_dir(cfg: ModelConfig) -> Path:
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path: no Hugging Face model folder at '{path}' (config.json missing)")
    if not list(path.glob("*.safetensors")) and not cfg.allow_pickle:
        raise ModelError(
            f"model.path: '{path}' has no .safetensors weights; pickle weights run code when loaded, "
            "so they need model.allow_pickle: true"
        )
    if cfg.lora and cfg.lora.adapter_path and not Path(cfg.lora.adapter_path).is_dir():
        raise ModelError(f"model.lora.adapter_path: no such folder '{cfg.lora.adapter_path}'")
    return path


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(cfg), trust_remote_code=cfg.trust_remote_code,
                                              local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of every loss
    return tokenizer


def auto_class(cfg: ModelConfig) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if cfg.task == "causal_lm" else AutoModelForSequenceClassification


def model_config(cfg: ModelConfig) -> Any:
    """The folder's config.json as a transformers config."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(check_model_dir(cfg), trust_remote_code=cfg.trust_remote_code,
                                      local_files_only=True)


def load_model(cfg: ModelConfig) -> nn.Module:
    """The model in eval mode, with a LoRA adapter if the job names one.

    Under a live `HfDeepSpeedConfig` (ZeRO-3) the parameters are partitioned as they load; the
    distributed job streams each rank's partitions instead (distinf.runtime.zero3).
    """
    model = auto_class(cfg).from_pretrained(
        check_model_dir(cfg), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
        use_safetensors=not cfg.allow_pickle, local_files_only=True,
    )
    if cfg.lora is not None:
        model = with_lora(model, cfg)
    return model.eval()


def with_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = cfg.lora
    if lora.adapter_path:
        return PeftModel.from_pretrained(model, lora.adapter_path, is_trainable=True)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha or 2 * lora.r, target_modules=lora.target_modules,
                        lora_dropout=0.0)
    return get_peft_model(model, config)


def model_fingerprint(cfg: ModelConfig) -> str:
    """sha256 over the config and each weight file's name, size, first and last MiB.

    Cheap enough for every run (no full read of GBs of weights) and changes with any re-save.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(cfg.model_dump(exclude={"path"}), sort_keys=True).encode())
    folders = [Path(cfg.path)] + ([Path(cfg.lora.adapter_path)] if cfg.lora and cfg.lora.adapter_path else [])
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.suffix not in {".json", ".safetensors", ".bin"}:
                continue
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}:".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                if size > 2 << 20:
                    handle.seek(-(1 << 20), 2)
                    digest.update(handle.read())
    return digest.hexdigest()
