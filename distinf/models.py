"""Loading the job's model and tokenizer from a local folder: never a hub, safetensors by default."""

from __future__ import annotations

import fnmatch
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


IGNORED_DIRS = frozenset({".git", ".cache", "__pycache__", ".ipynb_checkpoints"})
"""Folders inside a model or adapter folder that the fingerprint skips: version control, download
caches (`huggingface_hub` keeps `.cache/` in a local_dir) and Python's bytecode."""
IGNORED_FILES = ("*.lock", "*.incomplete", ".DS_Store")
"""File names the fingerprint skips: download locks and partial downloads, Finder's litter."""

FINGERPRINT_FORMAT = "v2-"
"""Prefix of a fingerprint over every file (`model_fingerprint`). One without it is of the earlier
format, over the top-level json, safetensors and bin files only."""


def model_files(folder: Path) -> list[Path]:
    """Every regular file under `folder` (symbolic links followed, as in a Hugging Face cache
    snapshot), in name order, less those in IGNORED_DIRS or matching IGNORED_FILES."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in IGNORED_DIRS)
        for name in files:
            path = Path(root) / name
            if path.is_file() and not any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED_FILES):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def model_fingerprint(cfg: ModelConfig, like: str | None = None) -> str:
    """sha256 over the model settings and, for every file under the model and adapter folders
    (`model_files`), its path in the folder, size and the sha256 of all its bytes.

    Every byte of every file counts (weights in subfolders, the tokenizer's vocab.txt, merges.txt
    or tokenizer.model, a chat_template.jinja, a remote-code model's *.py), so a changed model is
    never mixed with gradients of the old one; each file's sha256 is cached (fingerprint_cache_dir),
    so an unchanged multi-GB checkpoint is read once, not on every run.

    `like`: a stored run's fingerprint. One of the earlier format is compared with the earlier
    computation, so that runs stored before this format can still be resumed, appended to and
    queried (with that format's coverage).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(cfg.model_dump(exclude={"path"}), sort_keys=True).encode())
    folders = [Path(cfg.path)] + ([Path(cfg.lora.adapter_path)] if cfg.lora and cfg.lora.adapter_path else [])
    if like is not None and not like.startswith(FINGERPRINT_FORMAT):
        for folder in folders:
            for file in sorted(folder.iterdir()):
                if file.suffix in {".json", ".safetensors", ".bin"}:
                    digest.update(f"{file.name}:{file.stat().st_size}:{cached_file_sha256(file)}:".encode())
        return digest.hexdigest()
    for index, folder in enumerate(folders):
        for file in model_files(folder):
            name = file.relative_to(folder).as_posix()
            digest.update(f"{index}/{name}\0{file.stat().st_size}\0{cached_file_sha256(file)}\0".encode())
    return FINGERPRINT_FORMAT + digest.hexdigest()


def verify_model(cfg: ModelConfig, expected: str | None) -> None:
    """Refuse, on a worker at setup, a model or adapter folder that is not the one the driver
    fingerprinted: each node reads model.path itself, at every start and restart, and a model
    pipeline may write the same volume while the job runs."""
    if expected is None:
        return
    found = model_fingerprint(cfg, like=expected)
    if found != expected:
        raise ModelError(f"model.path: the files under '{cfg.path}'"
                         + (f" or '{cfg.lora.adapter_path}'" if cfg.lora and cfg.lora.adapter_path else "")
                         + f" on this node differ from those the job started with (fingerprint {found[:15]}..., "
                         f"expected {expected[:15]}...): the model changed while the job ran, or the nodes hold "
                         "different copies; run again once every node has the same model")


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
