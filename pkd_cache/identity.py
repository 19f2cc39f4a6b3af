"""What a teacher and its tokenizer are, read from their files without loading either: the cache key's teacher and
tokenizer parts (store/cache_key.py), so that `dump` finds a cached store before it builds a model.

- A local folder is its files' content: the sha256 of the weight files plus config.json (teacher), and of the
  tokenizer's files (tokenizer). Its path is not part of it: the same folder copied elsewhere is the same teacher.
- A hub model is its name and the commit its name resolves to (`revision`): online from the hub, offline from the
  local Hugging Face cache, which is what `from_pretrained` would load.

Imports no torch or transformers: a cache hit pays for hashing the files (about a second for bert-base) and nothing
else.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from .errors import PkdCacheError
from .models import looks_like_path, resolve_model_name

# the files whose bytes are the model's identity (weights in any of the formats transformers saves, and its config)
WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def local_folder(name: str) -> Optional[Path]:
    """The folder `name` names, None for a hub id; refuses a path that does not exist."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(name):
        raise PkdCacheError(f"model path {name} does not exist")
    return None


def files_fingerprint(folder: Path, names: list[str]) -> str:
    """sha256 over (name, size, sha256 of the bytes) of each file, in name order."""
    h = hashlib.sha256()
    for name in sorted(names):
        digest = hashlib.sha256()
        with open(folder / name, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        h.update(f"{name}|{(folder / name).stat().st_size}|{digest.hexdigest()}\n".encode())
    return h.hexdigest()


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    return sorted({p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def hub_revision(name: str) -> str:
    """The commit hub model `name` resolves to: asked of the hub unless offline, else read from the local cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(name).sha
        except Exception:  # noqa: BLE001 - unreachable or unknown: the local cache may still hold it
            pass
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../models--org--name/snapshots/<commit>/config.json
    raise PkdCacheError(f"cannot find model {name}: it is not a folder, and neither the Hugging Face hub (offline? "
                        f"pass a local folder) nor the local Hugging Face cache knows it")


def model_identity(name: str) -> dict:
    """The teacher part of a cache key: {"files": sha256} for a folder, {"hub": id, "revision": commit} else."""
    return _identity(name, WEIGHT_PATTERNS)


def tokenizer_identity(name: str) -> dict:
    """The tokenizer part of a cache key: its files' fingerprint, or the hub model's id and commit."""
    return _identity(name, TOKENIZER_FILES)


def _identity(name: str, patterns: tuple[str, ...]) -> dict:
    name = resolve_model_name(name)
    folder = local_folder(name)
    if folder is None:
        return {"hub": name, "revision": hub_revision(name)}
    # a folder without these files is not refused here: loading it (on a miss) says what is wrong with it
    return {"files": files_fingerprint(folder, _matching(folder, patterns))}


def has_task_head(name: str, num_labels: int) -> bool:
    """Whether the model's config says it was saved with a sequence-classification head of `num_labels` labels
    (a fine-tuned teacher), read from config.json alone. A hub model not cached locally counts as headless."""
    name = resolve_model_name(name)
    folder = local_folder(name)
    if folder is not None:
        path = folder / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    try:
        config = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    return any(str(a).endswith("ForSequenceClassification") for a in architectures) and labels == num_labels
