"""A store's identity: what it was made from, so that a dump that would write the same store is skipped.

The key is the sha256 of the canonical JSON (sorted keys, no spaces) of its parts:

    teacher    the teacher as given to `dump` (before any fine-tune `dump` does itself), from its files alone
               (pkd_cache/identity.py): {"files": sha256 of its weight files and config.json} for a folder,
               {"hub": id, "revision": commit} for a hub model; plus the fine-tune settings when its config has
               no head for the task (so `dump` fine-tunes it)
    tokenizer  the same for the tokenizer's files (tokenizer.json, vocab.txt, ...), or the hub id and commit
    data       {split: content fingerprint of the examples dumped}
    settings   what changes the stored values or their layout: max length, CLS dtype, splits, precision,
               fixed padding, chunk size, store format (zarr or arrow), format version
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

CACHE_SETTINGS = ("max_seq_length", "dtype", "splits", "precision", "pad_to_max_length", "chunk_size", "format",
                  "sort_window")


def cache_key(parts: dict) -> str:
    return _sha256(parts)


def covers(held: Optional[dict], asked: dict) -> bool:
    """Whether a store of key parts `held` holds the dump of parts `asked`: the same teacher, tokenizer and
    settings, and each split asked for with the same data (a store that `dump --add-split` grew holds more)."""
    if not isinstance(held, dict) or not isinstance(held.get("data"), dict):
        return False
    unsplit = lambda parts: {k: v for k, v in (parts.get("settings") or {}).items() if k != "splits"}  # noqa: E731
    return held.get("teacher") == asked["teacher"] and held.get("tokenizer") == asked["tokenizer"] and \
        unsplit(held) == unsplit(asked) and all(held["data"].get(s) == d for s, d in asked["data"].items())


def describe_difference(old: Optional[dict], new: dict) -> str:
    """What differs between two stores' key parts, in words ("teacher weights", "settings: dtype float16 -> int8")."""
    if not old:
        return "it records no cache key (written by an older pkd-cache)"
    out = []
    if old.get("teacher") != new.get("teacher"):
        out.append("teacher weights")
    if old.get("tokenizer") != new.get("tokenizer"):
        out.append("tokenizer")
    old_data, new_data = old.get("data") or {}, new.get("data") or {}
    changed = sorted(s for s in set(old_data) | set(new_data) if old_data.get(s) != new_data.get(s))
    if changed:
        out.append("data (" + ", ".join(changed) + ")")
    old_s, new_s = old.get("settings") or {}, new.get("settings") or {}
    out += [f"{k} {old_s.get(k)!r} -> {new_s.get(k)!r}" for k in sorted(set(old_s) | set(new_s))
            if old_s.get(k) != new_s.get(k)]
    return ", ".join(out) or "the key's definition"


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
