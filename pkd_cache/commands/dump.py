"""Stage 1: run the teacher once over a task and write everything students need into a store.

Memory stays flat: examples are tokenised, run and written one sort window (a few chunks) at a time, so nothing but
the current window's outputs is ever held. Within a window, examples are sorted by length so that each batch is
padded only to its own longest sequence (teacher/run.py); the window is then cut back into chunks in example order.
The complete flag is written last, after every split is on disk. Everything that could fail once the work has
started is tried first on a couple of examples (`_probe`), before `--out` is created or replaced.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np

from ..config import DumpConfig, FinetuneConfig, to_dict
from ..data.loading import load_examples
from ..data.tasks import get_task
from ..data.tokenize import check_seq_length, tokenize, tokenize_lengths
from ..distributed import barrier, broadcast, gather, process_group, rank_device, ranks_from_env
from .dump_shares import chunk_ranges, share_windows, sort_windows, window_tokens
from ..errors import Interrupted, PkdCacheError
from ..progress import log, progress_bar
from ..store.cache_key import CACHE_SETTINGS, cache_key, describe_difference, tokenizer_fingerprint
from ..store.fingerprint import vocab_fingerprint, weights_fingerprint
from ..store.format import FORMAT_VERSION, split_arrays
from ..store.location import is_url
from ..store.quantize import quantize_int8
from ..store.writer import BackgroundWriter, attach_writer, check_target, open_writer
from ..models import FINETUNE_INFO, LoadedModel, check_max_length, load_for_task
from ..teacher.run import run_chunk
from ..training import resolve_device


def finetuned_teacher_dir(out: str) -> Path:
    """Where `dump` keeps a teacher it had to fine-tune: beside the store (`sst2.zarr` -> `sst2.teacher`), or in
    the current folder when the store is remote (`s3://bucket/sst2.zarr` -> `./sst2.teacher`)."""
    p = Path(out.rstrip("/").rsplit("/", 1)[-1]) if is_url(out) else Path(out).expanduser()
    return p.with_name(p.name[:-5] + ".teacher" if p.name.endswith(".zarr") else p.name + ".teacher")


def dump(config: DumpConfig):
    """Write the store at `config.out`; returns the opened store. Under `torchrun`, every rank runs a share of the
    windows and writes its chunks into the one store; rank 0 lays the store out and finishes it."""
    config.check()
    ranks = ranks_from_env()
    task = get_task(config.task)
    existing = _existing_store(config)  # fail before any expensive work
    splits = config.splits or list(task.splits)
    unknown = [s for s in splits if s not in task.splits]
    if unknown:
        raise PkdCacheError(f"task {task.name} has no split {unknown[0]!r}; its splits are {', '.join(task.splits)}")
    examples = {s: load_examples(task, s, config.data_dir, config.max_examples) for s in splits}
    loaded = load_for_task(config.teacher, task)
    check_max_length(loaded, config.max_seq_length)
    for ex in examples.values():
        check_seq_length(loaded.tokenizer, ex, config.max_seq_length)
    key_parts = _key_parts(config, loaded, examples, splits)
    key = cache_key(key_parts)
    resuming = existing is not None and not existing.complete
    if resuming and existing.meta.get("cache_key") != key:
        diff = describe_difference(existing.meta.get("cache_key_parts"), key_parts)
        raise PkdCacheError(f"cannot resume {config.out}: it was started by a different dump (differs in: {diff}); "
                            f"pass --overwrite instead of --resume to start again")
    if existing is not None and not resuming:
        if existing.meta.get("cache_key") == key and not config.overwrite:
            log(f"cache hit: {config.out} already holds this dump (same teacher, tokenizer, data and settings; "
                f"key {key[:16]}); nothing to do")
            return existing
        if not config.overwrite:
            diff = describe_difference(existing.meta.get("cache_key_parts"), key_parts)
            raise PkdCacheError(f"--out {config.out} holds a different dump (differs in: {diff}); pass --overwrite "
                                f"to replace it")
    finetuned_dir = None
    if loaded.head_is_new:
        if ranks.many:
            raise PkdCacheError(f"teacher {loaded.name} has no trained {task.name} head; a multi-rank dump needs a "
                                f"fine-tuned teacher: run `pkd-cache finetune` first")
        loaded, finetuned_dir = _finetuned_teacher(config, task, loaded)
    if ranks.many and config.format != "zarr":
        raise PkdCacheError("a multi-rank dump writes zarr stores only; run --format arrow as one process")

    model, tokenizer = loaded.model, loaded.tokenizer
    device = rank_device(ranks, resolve_device(config.device))
    model.to(device).eval()
    _probe(config, model, tokenizer, examples, device)  # what would fail mid-dump fails here, before any write
    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    weights_fp = weights_fingerprint(model) if finetuned_dir else key_parts["teacher"]["weights"]
    metadata = {
        "teacher": {"name_or_path": config.teacher, "resolved": loaded.name, "base_model": loaded.base_model,
                    "finetuned_by_dump": str(finetuned_dir) if finetuned_dir else None,
                    "model_type": model.config.model_type, "architecture": type(model).__name__,
                    "num_layers": num_layers, "hidden_size": hidden,
                    "weights_fingerprint": weights_fp,
                    "config": json.loads(model.config.to_json_string())},
        "tokenizer": {"name_or_path": loaded.name, "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer.get_vocab()), "vocab_fingerprint": vocab_fingerprint(tokenizer),
                      "pad_token_id": tokenizer.pad_token_id},
        "task": {"name": task.name, "label_names": list(task.label_names), "num_labels": task.num_labels,
                 "is_regression": task.is_regression, "metric": task.metric, "dev_splits": list(task.dev_splits)},
        "max_seq_length": config.max_seq_length, "cls_dtype": config.dtype, "chunk_size": config.chunk_size,
        "settings": to_dict(config), "cache_key": key, "cache_key_parts": key_parts,
    }
    with process_group(ranks, device):
        barrier(ranks)  # every rank has looked at --out before rank 0 replaces or resumes it
        layout = (task, examples, key_parts, num_layers, hidden)
        writer = None
        try:
            if ranks.main:
                writer = open_writer(config.out, config.overwrite, metadata, config.format, resume=resuming)
                _create_splits(config, writer, *layout)
            barrier(ranks)  # the layout is on disk before the other ranks open it
            if writer is None:
                writer = attach_writer(config.out)
                _create_splits(config, writer, *layout)  # opens the arrays rank 0 created
            t0 = time.perf_counter()
            plan = broadcast(ranks, _plan(config, writer, tokenizer, examples, ranks.world) if ranks.main else None)
            try:
                computed = _run_share(config, writer, model, tokenizer, examples, plan, ranks, device)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted: {writer.durable_examples():,} of "
                                  f"{sum(len(e) for e in examples.values()):,} examples are durable in "
                                  f"{config.out}; run the same command with --resume to continue") from None
        except Exception as e:
            # bad input (or a bug it set off) is not worth resuming; a failing disk or network leaves the store
            # unfinished and resumable, as it does after the first chunk (docs/ERRORS.md)
            if writer is not None and not resuming and not ranks.many and not isinstance(e, (Interrupted, OSError)):
                _discard_unstarted(writer)
            raise
        finally:
            if writer is not None:
                writer.close()  # the lock; after a failure the store stays unfinished and resumable
        reports = gather(ranks, {"checksums": writer.checksums, "computed": computed,
                                 "durable": {s: sorted(c) for s, c in writer.durable.items()}})
        if ranks.main:
            _finish(config, writer, examples, reports, resuming, time.perf_counter() - t0, ranks)
        barrier(ranks)  # the other ranks return once the store is complete
    if ranks.main:
        total = sum(len(e) for e in examples.values())
        log(f"wrote {total:,} examples ({', '.join(f'{s} {len(e):,}' for s, e in examples.items())}) to "
            f"{config.out} in {writer.metadata['dump_seconds']:.1f}s; teacher {num_layers} layers x {hidden}"
            + (f"; {ranks.world} ranks" if ranks.many else ""))
        log(f"next: pkd-cache distill --store {config.out} --student-layers {max(1, num_layers // 2)} "
            f"--output-dir student/")
    from ..store.reader import open_store

    return open_store(config.out)


def _probe(config: DumpConfig, model, tokenizer, examples: dict, device) -> None:
    """Tokenise and run the teacher on a couple of examples of each split with the dump's settings, so that a
    setting that only fails once the work has started fails before `--out` is created or replaced."""
    int8 = config.dtype == "int8"
    for ex in examples.values():
        tokens = tokenize(tokenizer, ex, 0, min(2, len(ex)), config.max_seq_length)
        _, cls = run_chunk(model, tokens, config.batch_size, bucketed=not config.pad_to_max_length,
                           cls_dtype=np.dtype(np.float32 if int8 else config.dtype), device=device,
                           precision=config.precision)
        if int8:
            quantize_int8(cls)


def _discard_unstarted(writer) -> None:
    """A fresh store whose dump failed before its first chunk was durable is removed (it is ours, and holds
    nothing worth resuming); with a durable chunk it stays, unfinished and resumable."""
    if any(writer.durable.values()):
        return
    try:
        writer.location.remove_all()  # still under our lock: no other dump can have started in it
    except OSError:
        pass  # the original error matters more; what is left is an unfinished store that --overwrite replaces


def _create_splits(config: DumpConfig, writer, task, examples: dict, key_parts: dict, num_layers: int,
                   hidden: int) -> None:
    for split, ex in examples.items():
        shapes = split_arrays(len(ex), config.max_seq_length, task.num_labels, num_layers, hidden, config.dtype,
                              "float32" if task.is_regression else "int64")
        writer.create_split(split, shapes, {"source": ex.source, "data_fingerprint": key_parts["data"][split]})


def _plan(config: DumpConfig, writer, tokenizer, examples: dict, world: int) -> dict:
    """Rank 0's plan: {split: {"durable": chunks already written, "shares": each rank's windows}}. A window with
    nothing left to write is left out; one with some chunks left is recomputed whole (the same batches)."""
    plan = {}
    for split, ex in examples.items():
        durable = writer.load_durable(split)
        windows = [w for w in sort_windows(len(ex), config.chunk_size, config.sort_window)
                   if any(a // config.chunk_size not in durable for a, _ in chunk_ranges(*w, config.chunk_size))]
        costs = [float(w[1] - w[0]) for w in windows]
        if world > 1:  # balanced by the teacher's padded tokens, not by examples
            lengths = tokenize_lengths(tokenizer, ex, config.max_seq_length)
            costs = [float(window_tokens(lengths[a:b], config.batch_size, config.max_seq_length,
                                         not config.pad_to_max_length)) for a, b in windows]
        plan[split] = {"durable": sorted(durable), "shares": share_windows(windows, costs, world)}
    return plan


def _run_share(config: DumpConfig, writer, model, tokenizer, examples: dict, plan: dict, ranks, device) -> int:
    """Run the teacher over this rank's windows; the background writer writes their chunks not yet durable."""
    int8 = config.dtype == "int8"
    cls_dtype = np.dtype(np.float32 if int8 else config.dtype)  # int8 is quantised from float32 below
    computed = 0
    with stop_on_sigterm():
        # room for a whole window's chunks: the teacher runs the next window while this one is written
        background = BackgroundWriter(writer, depth=max(2, config.sort_window // config.chunk_size))
        try:
            for split, ex in examples.items():
                durable = set(plan[split]["durable"])
                writer.durable.setdefault(split, set()).update(durable)
                windows = plan[split]["shares"][ranks.rank]
                label = f"dump {split}" + (f" ({ranks})" if ranks.many else "")
                with progress_bar(sum(b - a for a, b in windows), label) as bar:
                    for start, stop in windows:
                        todo = [c for c in chunk_ranges(start, stop, config.chunk_size)
                                if c[0] // config.chunk_size not in durable]
                        # tokenised a chunk at a time: the tokenizer's per-example objects never exist for a whole
                        # window (same arrays either way; benchmarks/RESULTS.md, B6)
                        parts = [tokenize(tokenizer, ex, a, b, config.max_seq_length)
                                 for a, b in chunk_ranges(start, stop, config.chunk_size)]
                        tokens = {k: np.concatenate([t[k] for t in parts]) for k in parts[0]}
                        logits, cls = run_chunk(model, tokens, config.batch_size,
                                                bucketed=not config.pad_to_max_length, cls_dtype=cls_dtype,
                                                device=device, precision=config.precision)
                        arrays = {**tokens, "labels": ex.labels[start:stop], "logits": logits, "cls": cls}
                        for a, b in todo:
                            chunk = {k: v[a - start:b - start] for k, v in arrays.items()}
                            if int8:
                                chunk["cls"], chunk["cls_scale"] = quantize_int8(chunk["cls"])
                            background.put(split, a, chunk)
                            computed += b - a
                        bar.advance(stop - start)
                        release_free_memory()
        finally:
            background.close()  # drains the queue (what is queued becomes durable); re-raises a write error
    return computed


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim) after each window. Windows of varying batch
    widths leave free holes all over the heap; without this the dump's RSS creeps up over a long run."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def _finish(config: DumpConfig, writer, examples: dict, reports: list[dict], resuming: bool, seconds: float,
            ranks) -> None:
    """Rank 0: every rank's checksums into the manifest, then (only if every chunk is durable) the complete flag."""
    for r in reports:
        writer.checksums.update({k: list(v) for k, v in r["checksums"].items()})
        for split, chunks in r["durable"].items():
            writer.durable.setdefault(split, set()).update(chunks)
    for split, ex in examples.items():
        missing = sorted(set(range(-(-len(ex) // config.chunk_size))) - writer.durable.get(split, set()))
        if missing:
            raise PkdCacheError(f"{config.out}: chunks {missing[:5]} of {split} were not written; run the same "
                                f"command with --resume to finish the store")
    computed = sum(r["computed"] for r in reports)
    if resuming:
        kept = sum(len(e) for e in examples.values()) - computed
        log(f"resumed {config.out}: {kept:,} examples were durable already, the teacher ran on {computed:,}")
        writer.metadata["resumptions"][-1] = {"at": writer.metadata["resumptions"][-1], "kept_examples": kept,
                                              "computed_examples": computed}
    writer.metadata["dump_seconds"] = round(seconds, 3)  # tokenise + forward + write, all splits
    if ranks.many:
        writer.metadata["dump_ranks"] = ranks.world
    writer.finish()


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM stops a dump like Ctrl-C: the writer drains, the store stays resumable (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _existing_store(config: DumpConfig):
    """The complete store already at `--out` (a possible cache hit), None if there is nothing there.

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


def _key_parts(config: DumpConfig, loaded: LoadedModel, examples: dict, splits: list[str]) -> dict:
    """The cache key's parts (store/cache_key.py); the teacher as given, plus how dump would fine-tune it."""
    # a head that loading just initialised at random is not part of the teacher's identity: only its base is
    base = loaded.model.base_model_prefix + "." if loaded.head_is_new else ""
    teacher = {"weights": weights_fingerprint(loaded.model, base)}
    if loaded.head_is_new and config.finetune:
        teacher["finetune"] = {k: v for k, v in to_dict(config.finetune_train).items()}
    vocab = vocab_fingerprint(loaded.tokenizer)
    settings = {k: getattr(config, k) for k in CACHE_SETTINGS} | {"splits": splits, "format_version": FORMAT_VERSION}
    return {"teacher": teacher, "tokenizer": tokenizer_fingerprint(loaded.tokenizer, vocab),
            "data": {s: ex.fingerprint() for s, ex in examples.items()}, "settings": settings}


def _finetuned_teacher(config: DumpConfig, task, loaded) -> tuple[LoadedModel, Path]:
    """A teacher without a trained head is fine-tuned first (the paper's recipe) into `<store>.teacher`.

    A finished fine-tune already there with the same settings is reused, so a dump that failed after the
    fine-tune does not pay for it twice.
    """
    if not config.finetune:
        raise PkdCacheError(f"teacher {loaded.name} has no trained {task.name} head (its classifier would be "
                            f"newly initialised); fine-tune it with `pkd-cache finetune` or drop --no-finetune")
    target = finetuned_teacher_dir(config.out)
    ft = FinetuneConfig(model=loaded.name, task=task.name, output_dir=str(target), data_dir=config.data_dir,
                        max_seq_length=config.max_seq_length, overwrite=config.overwrite,
                        max_train_samples=config.max_examples, max_eval_samples=config.max_examples,
                        train=config.finetune_train)
    info_path = target / FINETUNE_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        same = {k: v for k, v in to_dict(ft).items() if k != "overwrite"} == \
            {k: v for k, v in info.get("config", {}).items() if k != "overwrite"}
        if same and "metrics" in info:
            log(f"reusing the teacher fine-tuned earlier with the same settings in {target}")
            return load_for_task(str(target), task), target
    if target.exists() and any(target.iterdir()) and not config.overwrite:
        raise PkdCacheError(f"{target} (where dump keeps the teacher it fine-tunes) exists from other settings; "
                            f"remove it or pass --overwrite")
    log(f"teacher {loaded.name} has no trained {task.name} head: fine-tuning it first "
        f"({config.finetune_train.epochs:g} epochs, lr {config.finetune_train.learning_rate:g}) into {target}")
    from .finetune import finetune

    ft.overwrite = True  # checked above: what is there is ours to replace
    finetune(ft, loaded=loaded)
    return load_for_task(str(target), task), target
