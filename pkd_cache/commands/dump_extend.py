"""`dump --add-split NAME`: add a split to a complete store, without rewriting what it holds.

The store is `--out` (a path, URL or cache id), or without `--out` the cache entry of the same dump without the new
split. The split is dumped with the store's own teacher and settings: a setting left at its default takes the
store's value, one given that differs from the store's is refused (one line naming it), and the teacher loaded must
have the store's weights fingerprint. The new chunks are written beside the old ones under the store's lock; the
grown manifest, then the metadata listing the split, are written last (store/sink.py). Until then the store reads
exactly as before; an extension stopped half way leaves an unlisted folder that the next one replaces.
"""
from __future__ import annotations

import dataclasses

from ..config import CLS_DTYPES, DumpConfig, TrainConfig
from ..data.loading import load_examples
from ..data.tasks import TaskSpec, get_task
from ..errors import PkdCacheError
from ..store.cache import cache_url, entry_url, resolve_store
from ..store.cache_key import CACHE_SETTINGS, cache_key, describe_difference
from ..store.location import Location
from .dump_cache import dump_key_parts

# the dump settings a split is added with: the store's (what the cache key records, plus how a teacher without a
# head was fine-tuned, which finds that fine-tuned teacher again)
STORE_SETTINGS = tuple(k for k in CACHE_SETTINGS if k != "splits") + ("max_examples", "finetune_train")


def add_splits(config: DumpConfig):
    """Add `config.add_splits` to the store; returns it opened."""
    from ..store.reader import open_store

    task = get_task(config.task)
    new = list(dict.fromkeys(config.add_splits))
    unknown = [s for s in new if s not in task.splits]
    if unknown:
        raise PkdCacheError(f"task {task.name} has no split {unknown[0]!r}; its splits are {', '.join(task.splits)}")
    target = _target(config, task, new)
    meta = open_store(target).info()  # complete, its layout checked
    held = [s for s in new if s in meta.get("splits", {})]
    if held:
        raise PkdCacheError(f"{target} already holds split {held[0]!r}")
    if meta.get("task", {}).get("name") != task.name:
        raise PkdCacheError(f"{target} holds task {meta.get('task', {}).get('name')!r}, not {task.name!r}")
    parts = meta.get("cache_key_parts")
    if not isinstance(parts, dict) or not isinstance(meta.get("settings"), dict):
        raise PkdCacheError(f"{target} records no cache key (written by an older pkd-cache): a split cannot be "
                            f"added to it; dump it again")
    config = _with_store_settings(config, meta["settings"], target)
    config = dataclasses.replace(config, out=target, splits=new)
    examples = {s: load_examples(task, s, config.data_dir, config.max_examples) for s in new}
    asked = dump_key_parts(config, task, examples)
    same = {k: v for k, v in asked.items() if k != "data"}
    same["settings"] = {k: v for k, v in same["settings"].items() if k != "splits"}
    theirs = {k: parts.get(k) for k in same}
    theirs["settings"] = {k: v for k, v in (parts.get("settings") or {}).items() if k != "splits"}
    if theirs != same:
        raise PkdCacheError(f"{target} was dumped from another teacher or with other settings (differs in: "
                            f"{describe_difference(theirs, same)}); a split is added with the store's own")
    merged = {**parts, "data": {**parts["data"], **asked["data"]},
              "settings": {**parts["settings"], "splits": list(parts["settings"]["splits"]) + new}}
    from .dump_run import run_dump  # torch, transformers: only once there is work to do

    return run_dump(config, task, examples, merged, meta["cache_key"], resuming=False, extend=meta)


def _target(config: DumpConfig, task: TaskSpec, new: list[str]) -> str:
    """The store to extend: `--out` (an id resolves in the cache), or the cache entry of this dump without `new`."""
    if config.out is not None:
        return resolve_store(config.out, config.cache)
    cache = cache_url(config.cache)
    if cache is None:
        raise PkdCacheError("--add-split needs the store to extend: --out, or a cache holding it (--cache URL or "
                            "PKD_CACHE)")
    splits = [s for s in (config.splits or task.splits) if s not in new]
    base = dataclasses.replace(config, splits=splits)
    examples = {s: load_examples(task, s, config.data_dir, config.max_examples) for s in splits}
    key = cache_key(dump_key_parts(base, task, examples))
    url = entry_url(cache, task.name, config.teacher, key, config.format)
    if not Location(url).exists():
        raise PkdCacheError(f"cache {cache} holds no store of this dump (splits {', '.join(splits)}): run it "
                            f"without --add-split first, or name the store with --out")
    return url


def _with_store_settings(config: DumpConfig, recorded: dict, target: str) -> DumpConfig:
    """`config` with the store's dump settings: where `config` left one at its default, the store's value; where
    it gave another value, a refusal."""
    default = DumpConfig(teacher=config.teacher, task=config.task)
    taken = {}
    for name in STORE_SETTINGS:
        if name not in recorded:
            continue
        theirs = recorded[name]
        if name == "finetune_train":
            if not isinstance(theirs, dict):
                raise PkdCacheError(f"{target} records an impossible fine-tune setting ({theirs!r}); dump it again")
            theirs = TrainConfig(**{k: v for k, v in theirs.items() if k in TrainConfig.__dataclass_fields__})
        mine = getattr(config, name)
        if mine != getattr(default, name) and mine != theirs:
            raise PkdCacheError(f"{target} was dumped with {_flag(name)} {_shown(theirs)}, not {_shown(mine)}: a "
                                f"split is added with the store's settings (leave {_flag(name)} out)")
        taken[name] = theirs
    if taken.get("dtype", config.dtype) not in CLS_DTYPES:
        raise PkdCacheError(f"{target} records an unknown CLS dtype {taken['dtype']!r}")
    config = dataclasses.replace(config, **taken)
    try:  # the store's values are as untrusted as any input: checked as if given on the command line
        config.check()
    except PkdCacheError as e:
        raise PkdCacheError(f"{target} records a setting no dump takes ({e}); dump it again") from None
    return config


def _flag(name: str) -> str:
    return {"format": "--format", "finetune_train": "--finetune-*/--seed"}.get(name, "--" + name.replace("_", "-"))


def _shown(value) -> str:
    return repr(value) if not isinstance(value, TrainConfig) else \
        f"(epochs {value.epochs:g}, lr {value.learning_rate:g}, seed {value.seed})"
