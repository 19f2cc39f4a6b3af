"""Stage 1: run the teacher once over a task and write everything students need into a store.

`dump` first computes the store's cache key from files alone (the teacher's and tokenizer's files or hub commit,
the examples' content and the settings; store/cache_key.py), with no model loaded and no torch imported. The key
says where the store goes when a cache is used (`--cache` or $PKD_CACHE, store/cache.py), and whether the store is
already there: a hit returns it within seconds. Only a miss loads the teacher and runs it (commands/dump_run.py).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

from ..config import DumpConfig
from ..data.loading import load_examples
from ..data.tasks import TaskSpec, get_task
from ..errors import PkdCacheError, StoreBusy
from ..progress import log
from ..store.cache import cache_url, claim_url, entry_url, record_use
from ..store.cache_key import cache_key
from ..store.integrity import durable_count
from ..store.journal import WriterLock, describe_holder
from ..store.location import Location
from ..store.registry import backend_named
from .dump_cache import cache_policy, dump_key_parts, existing_store


def dump(config: DumpConfig):
    """Write the store at `config.out`, or at its place in the cache when there is no `out`; returns the opened
    store (the one already there, on a cache hit)."""
    config.check()
    backend_named(config.format)  # an unknown format fails before any data or model is loaded
    if config.add_splits:
        from .dump_extend import add_splits

        return add_splits(config)
    cache = cache_url(config.cache)
    if config.out is None and cache is None:
        raise PkdCacheError("dump needs --out, or a cache to put the store in (--cache URL or PKD_CACHE)")
    if config.is_lm:
        from .dump_lm import lm_key_parts, load_corpora

        task, existing = None, existing_store(config) if config.out else None
        examples = load_corpora(config)
        key_parts = lm_key_parts(config, examples)
    else:
        task = get_task(config.task)
        existing = existing_store(config) if config.out else None  # fail before any expensive work
        examples = _load_examples(config, task)
        key_parts = dump_key_parts(config, task, examples)
    key = cache_key(key_parts)
    if config.out is not None:
        policy = cache_policy(config, existing, key, key_parts)
        return existing if policy == "hit" else _run(config, task, examples, key_parts, key, policy)
    # its place in the cache: an unfinished store there is this dump's (the key is in the name), so it is resumed
    name = task.name if task is not None else config.task
    config = dataclasses.replace(config, out=entry_url(cache, name, config.teacher, key, config.format), resume=True)
    claim = Location(claim_url(config.out))  # held by the one dump of this key that runs the teacher
    store_location, name = Location(config.out), config.out[len(cache.rstrip("/")) + 1:]  # name: `task/entry`
    while True:
        wait_for_claim(claim, store_location, config.out, config.wait)
        existing = existing_store(config)
        if cache_policy(config, existing, key, key_parts) == "hit":  # a hit writes no store: a read-only cache serves
            record_use(cache, name)
            return existing
        lock = WriterLock(claim)
        try:  # of two dumps of one key that get here at once, one takes the claim; the other waits for it
            lock.acquire()
        except StoreBusy:
            continue
        except PermissionError as e:
            raise PkdCacheError(f"cannot write to cache {cache} ({e.strerror or e}): a dump that misses puts its "
                                f"store there; ask for write access, or pass --out") from e
        try:  # looked at again under the claim: the dump that held it may have just finished
            existing = existing_store(config)
            policy = cache_policy(config, existing, key, key_parts)
            store = existing if policy == "hit" else _run(config, task, examples, key_parts, key, policy)
            record_use(cache, name)
            return store
        finally:
            lock.release()  # the (hidden, empty) claim folder stays: removing it could remove a newer claim


def _run(config: DumpConfig, task: Optional[TaskSpec], examples: dict, key_parts: dict, key: str, policy: str):
    if config.is_lm:
        from .dump_lm import run_lm_dump

        return run_lm_dump(config, examples, key_parts, key, resuming=policy == "resume")
    from .dump_run import run_dump  # torch, transformers: only once there is work to do

    return run_dump(config, task, examples, key_parts, key, resuming=policy == "resume")


def wait_for_claim(claim: Location, store: Location, url: str, wait: bool, poll: float = 2.0) -> None:
    """Return once no live dump holds the claim on the cache entry `url`; with `wait` false, refuse instead."""
    lock, said = WriterLock(claim), 0.0
    while (holder := lock.live_holder()) is not None:
        if not wait:
            raise StoreBusy(f"{url} is being written by another dump ({describe_holder(holder)}); run again "
                            f"without --no-wait to wait for it")
        if time.monotonic() - said > 30:
            log(f"waiting for the dump writing {url} ({describe_holder(holder)}): "
                f"{durable_count(store):,} chunk(s) written so far")
            said = time.monotonic()
        time.sleep(poll)


def _load_examples(config: DumpConfig, task: TaskSpec) -> dict:
    splits = config.splits or list(task.splits)
    unknown = [s for s in splits if s not in task.splits]
    if unknown:
        raise PkdCacheError(f"task {task.name} has no split {unknown[0]!r}; its splits are {', '.join(task.splits)}")
    return {s: load_examples(task, s, config.data_dir, config.max_examples) for s in splits}
