"""Loading the job's model and tokenizer from a local folder: never a hub, safetensors by default."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
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
        if tokenizer.eos_token is None:  # the same on every load: refused here, before any worker starts
            raise ModelError(f"model.path: the tokenizer in '{cfg.path}' has neither a pad nor an eos token, so "
                             "batches cannot be padded; set pad_token in its tokenizer_config.json")
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


def meta_model(cfg: ModelConfig) -> nn.Module:
    """The job's model built from its config.json on the meta device: every parameter's name and
    shape (ties included), which of them train, and no weights read or memory taken for them. A
    saved LoRA adapter is stood in for by a fresh one of its adapter_config.json: the same names
    and shapes."""
    with torch.device("meta"):
        model = auto_class(cfg).from_config(model_config(cfg), trust_remote_code=cfg.trust_remote_code)
        if cfg.lora is not None and cfg.lora.adapter_path:
            from peft import PeftConfig, get_peft_model

            model = get_peft_model(model, PeftConfig.from_pretrained(cfg.lora.adapter_path))
        elif cfg.lora is not None:
            model = with_lora(model, cfg)
    return model


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
    """sha256 over the config and each weight and config file's name, size and sha256 of all its bytes.

    Every byte counts, so a re-saved fine-tune whose changes lie anywhere in a file is never mixed
    with gradients of the old weights; each file's sha256 is cached (fingerprint_cache_dir), so an
    unchanged multi-GB checkpoint is read once, not on every run.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(cfg.model_dump(exclude={"path"}), sort_keys=True).encode())
    folders = [Path(cfg.path)] + ([Path(cfg.lora.adapter_path)] if cfg.lora and cfg.lora.adapter_path else [])
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.suffix not in {".json", ".safetensors", ".bin"}:
                continue
            digest.update(f"{file.name}:{file.stat().st_size}:{cached_file_sha256(file)}:".encode())
    return digest.hexdigest()


def fingerprint_cache_dir() -> Path:
    """$DISTINF_CACHE, else $XDG_CACHE_HOME/distinf, else ~/.cache/distinf: per user, never shared."""
    if os.environ.get("DISTINF_CACHE"):
        return Path(os.environ["DISTINF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distinf"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


_RACY_NS = 2_000_000_000
"""Files saved less than this long ago are not cached, as git treats racily clean files: some
filesystems keep mtimes to the second (or two), so two saves in one tick could share an mtime."""


def cached_file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, hashed again only when its (path, size, mtime_ns, inode) changed.

    Any re-save (a new file, or the same one rewritten) changes the mtime, the inode or the size.
    A cache that cannot be read or written (read-only home, a full disk) only costs the hashing.
    """
    path = path.resolve()
    stat = path.stat()
    identity = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    entry = fingerprint_cache_dir() / "sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"
    try:
        cached = json.loads(entry.read_text(encoding="utf-8"))
        if {key: cached.get(key) for key in identity} == identity and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    sha256 = _file_sha256(path)
    if time.time_ns() - stat.st_mtime_ns < _RACY_NS:
        return sha256  # saved just now: a re-save within the same mtime tick would look unchanged
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent)
    except OSError:
        return sha256
    try:  # renamed into place whole: a reader never sees half an entry, parallel writers are harmless
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump({**identity, "sha256": sha256}, out)
        os.replace(tmp, entry)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
    return sha256
