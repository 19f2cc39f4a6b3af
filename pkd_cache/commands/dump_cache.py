"""`dump`'s cache policy: what is at `--out` already, the key of the dump asked for, and what to do about the two.

A complete store with the same key is a cache hit (nothing to do); an unfinished one with the same key is resumed
(`--resume`); anything else at `--out` is refused unless `--overwrite` (docs/ERRORS.md).
"""
from __future__ import annotations

from typing import Literal

from ..config import DumpConfig, to_dict, train_identity
from ..errors import PkdCacheError
from ..data.tasks import TaskSpec
from ..progress import log
from ..store.cache import store_id
from ..store.cache_key import CACHE_SETTINGS, covers, describe_difference
from ..store.format import FORMAT_VERSION
from ..store.writer import check_target
from ..identity import has_task_head, model_identity, tokenizer_identity

CachePolicy = Literal["hit", "resume", "write"]


def existing_store(config: DumpConfig):
    """The complete store already at `--out` (a possible cache hit), or the unfinished one `--resume` continues;
    None if there is nothing there to keep.

    Anything else at `--out` (not a store, an unfinished store) is refused now unless `--overwrite`.
    """
    from ..store.reader import open_store
    from ..store.writer import is_store

    location = check_target(config.out, overwrite=True)  # refuses to replace what is not a store
    if not location.exists():
        return None
    if is_store(location):
        store = open_store(config.out, require_complete=False)
        if store.complete or (config.resume and not config.overwrite):
            return store
        if not config.overwrite:
            raise PkdCacheError(f"--out {config.out} is an unfinished store (its dump did not complete); pass "
                                f"--resume to continue it or --overwrite to start again")
        return None
    check_target(config.out, config.overwrite)
    return None


def cache_policy(config: DumpConfig, existing, key: str, key_parts: dict) -> CachePolicy:
    """"hit" (the store at `--out` holds this dump), "resume" (it is this dump, unfinished) or "write"; refuses a
    different dump at `--out` unless `--overwrite`."""
    if existing is None:
        return "write"
    meta = existing.info()  # a dict: an unfinished store's metadata may not yet describe every array (no splits)
    if not existing.complete:
        if meta.get("cache_key") != key:
            diff = describe_difference(meta.get("cache_key_parts"), key_parts)
            raise PkdCacheError(f"cannot resume {config.out}: it was started by a different dump (differs in: "
                                f"{diff}); pass --overwrite instead of --resume to start again")
        return "resume"
    if (meta.get("cache_key") == key or covers(meta.get("cache_key_parts"), key_parts)) and not config.overwrite:
        # never served damaged: the layout against the manifest, and each chunk file's presence and size (local
        # stores); a flipped bit that keeps the size is caught when the chunk is read (its CRC)
        problems = existing.layout_problems(check_files=True)
        if problems:
            raise PkdCacheError(f"{config.out} holds this dump but fails its checks ({problems[0]}); it is not "
                                f"used: run `pkd-cache verify {config.out}`, then dump again with --overwrite")
        log(f"cache hit: {config.out} (id {store_id(key)}): it holds this dump already (same teacher, tokenizer, "
            f"data and settings); nothing to do")
        return "hit"
    if not config.overwrite:
        diff = describe_difference(meta.get("cache_key_parts"), key_parts)
        raise PkdCacheError(f"--out {config.out} holds a different dump (differs in: {diff}); pass --overwrite "
                            f"to replace it")
    return "write"


def dump_key_parts(config: DumpConfig, task: TaskSpec, examples: dict) -> dict:
    """The cache key's parts (store/cache_key.py), from files alone (pkd_cache/identity.py): the teacher as given,
    plus how dump would fine-tune it when its config has no head for the task."""
    teacher = model_identity(config.teacher)
    if config.finetune and not has_task_head(config.teacher, task.num_labels):
        teacher["finetune"] = train_identity(to_dict(config.finetune_train))
    settings = {k: getattr(config, k) for k in CACHE_SETTINGS} | {"splits": list(examples),
                                                                  "format_version": FORMAT_VERSION}
    return {"teacher": teacher, "tokenizer": tokenizer_identity(config.teacher),
            "data": {s: ex.fingerprint() for s, ex in examples.items()}, "settings": settings}
