"""The work of a dump once its cache key missed: load the teacher (fine-tuning it first if its head is new), probe
it, then run it over windows of examples and write every chunk into the store (see commands/dump.py).

Memory stays flat: examples are tokenised, run and written one sort window (a few chunks) at a time, so nothing but
the current window's outputs is ever held. Within a window, examples are sorted by length so that each batch is
padded only to its own longest sequence (teacher/run.py); the window is then cut back into chunks in example order.
The complete flag is written last, after every split is on disk. Everything that could fail once the work has
started is tried first on a couple of examples (`_probe`), before `--out` is created or replaced.
"""
from __future__ import annotations

import ctypes
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import DumpConfig, to_dict
from ..data.tasks import TaskSpec
from ..data.tokenize import check_seq_length, tokenize, tokenize_lengths
from ..distributed import Ranks, barrier, broadcast, gather, process_group, rank_device, ranks_from_env
from ..errors import Interrupted, PkdCacheError
from ..models import LoadedModel, check_max_length, load_for_task
from ..progress import log, progress_bar
from ..store.arrays.text_hash import NAME as TEXT_HASH
from ..store.arrays.text_hash import text_hashes
from ..store.fingerprint import vocab_fingerprint, weights_fingerprint
from ..store.format import now, split_arrays, with_derived
from ..store.location import Location
from ..store.quantize import quantize_int8
from ..store.registry import read_metadata
from ..store.writer import BackgroundWriter, attach_writer, open_writer
from ..teacher.run import run_chunk
from ..training import resolve_device
from .dump_reuse import Donor, find_donor, window_arrays
from .dump_shares import chunk_ranges, share_windows, sort_windows, window_tokens
from .dump_teacher import teacher_to_run
from .interrupt import stop_on_sigterm


EXTRA_ARRAYS = ("example_hash", "text_hash")  # optional arrays (store/arrays/) every new store holds


def run_dump(config: DumpConfig, task: TaskSpec, examples: dict, key_parts: dict, key: str, resuming: bool,
             extend: Optional[dict] = None):
    """Load the teacher and write the store at `config.out` (resuming its durable chunks); returns the opened store.
    Under `torchrun`, every rank runs a share of the windows and writes its chunks into the one store; rank 0 lays
    the store out and finishes it.

    `extend`: the metadata of the complete store at `config.out` that `examples` (new splits) are added to
    (commands/dump_extend.py); `key_parts` then describe the store with them."""
    ranks = ranks_from_env()
    if extend is not None and ranks.many:
        raise PkdCacheError("--add-split runs as one process; run it without torchrun")
    loaded = load_for_task(config.teacher, task)
    check_max_length(loaded, config.max_seq_length)
    for ex in examples.values():
        check_seq_length(loaded.tokenizer, ex, config.max_seq_length)
    loaded, finetuned_dir = teacher_to_run(config, task, loaded, ranks, key_parts)
    if ranks.many and config.format != "zarr":
        raise PkdCacheError("a multi-rank dump writes zarr stores only; run --format arrow as one process")
    device = rank_device(ranks, resolve_device(config.device))
    loaded.model.to(device).eval()
    job = _Job(config, task, examples, key_parts, resuming, ranks, device, loaded.model, loaded.tokenizer,
               find_donor(config.cache, task.name, key_parts, config.out), extend,
               _held_extras(config.out, resuming, extend))
    metadata = _metadata(job, loaded, finetuned_dir, key) if extend is None else _extended(job, extend)
    _probe(job)  # what would fail mid-dump fails here, before any write
    writer = _write(job, metadata)
    if ranks.main:
        if job.donor is not None:
            job.donor.report(job.total)
        _log_done(job, writer)
    from ..store.reader import open_store

    return open_store(config.out)


@dataclass
class _Job:
    """A dump, checked and ready to run: what every step from the probe to the complete flag needs."""

    config: DumpConfig
    task: TaskSpec
    examples: dict  # split -> its examples, in the order of --splits
    key_parts: dict
    resuming: bool
    ranks: Ranks
    device: Any  # torch.device
    model: Any
    tokenizer: Any
    donor: Optional[Donor] = None  # a cached store whose rows this dump reuses (commands/dump_reuse.py)
    extend: Optional[dict] = None  # the metadata of the complete store this dump adds splits to
    extras: tuple[str, ...] = EXTRA_ARRAYS  # the optional arrays (store/arrays/) the store holds

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden(self) -> int:
        return self.model.config.hidden_size

    @property
    def total(self) -> int:
        return sum(len(e) for e in self.examples.values())


def _held_extras(out: str, resuming: bool, extend: Optional[dict]) -> tuple[str, ...]:
    """The optional arrays the store holds: a new store's EXTRA_ARRAYS; a store resumed or added to keeps its own
    (one begun by an older pkd-cache lacks the newer ones)."""
    meta = extend if extend is not None else (read_metadata(Location(out)) or {}) if resuming else None
    return EXTRA_ARRAYS if meta is None else tuple(meta.get("extra_arrays") or ())


def _absolute(name: Optional[str]) -> Optional[str]:
    """A model named by a local folder is recorded by its absolute path (one that still means something on a shared
    filesystem, where a relative one would not); a hub name as it is. `identity` is the portable reference."""
    if name is not None and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def source_name(source: str) -> str:
    """How the metadata names where a split came from: a file by its last two path components
    (`SST-2/train.tsv`: a relative or absolute path means nothing once the store is shared), a hub dataset as is.
    The data itself is identified by `data_fingerprint`."""
    path = Path(source)
    return "/".join(path.parts[-2:]) if path.is_file() else source


def _metadata(job: _Job, loaded: LoadedModel, finetuned_dir: Optional[Path], key: str) -> dict:
    """The store's metadata: the teacher, tokenizer and task it was dumped with, and the dump's settings and key."""
    config, task, model, tokenizer = job.config, job.task, job.model, job.tokenizer
    return {
        "teacher": {"name_or_path": _absolute(config.teacher), "resolved": _absolute(loaded.name),
                    "base_model": _absolute(loaded.base_model),
                    "finetuned_by_dump": str(finetuned_dir.resolve()) if finetuned_dir else None,
                    "finetuned_id": finetuned_dir.name.rsplit("-", 1)[-1] if finetuned_dir else None,
                    "model_type": model.config.model_type, "architecture": type(model).__name__,
                    "num_layers": job.num_layers, "hidden_size": job.hidden,
                    "weights_fingerprint": weights_fingerprint(model),
                    "identity": job.key_parts["teacher"],  # portable: its files' fingerprint, or hub id and commit
                    "config": json.loads(model.config.to_json_string())},
        "tokenizer": {"name_or_path": _absolute(loaded.name), "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer.get_vocab()), "vocab_fingerprint": vocab_fingerprint(tokenizer),
                      "pad_token_id": tokenizer.pad_token_id},
        "task": {"name": task.name, "label_names": list(task.label_names), "num_labels": task.num_labels,
                 "is_regression": task.is_regression, "metric": task.metric, "dev_splits": list(task.dev_splits)},
        "max_seq_length": config.max_seq_length, "cls_dtype": config.dtype, "chunk_size": config.chunk_size,
        "settings": to_dict(config), "cache_key": key, "cache_key_parts": job.key_parts,
        "extra_arrays": list(job.extras),
    }


def _extended(job: _Job, meta: dict) -> dict:
    """The metadata of a store with this dump's splits added: the store's own, its key parts now covering them.
    Its `cache_key` (the id it is found by) stays. The teacher must be the very one that wrote the store."""
    fingerprint = weights_fingerprint(job.model)
    if fingerprint != meta["teacher"].get("weights_fingerprint"):
        raise PkdCacheError(f"{job.config.out}: the teacher loaded now ({job.config.teacher}) is not the one whose "
                            f"outputs the store holds (its weights differ); a split is added with the store's own "
                            f"teacher")
    meta = json.loads(json.dumps(meta))  # a copy
    meta["cache_key_parts"] = job.key_parts
    meta["settings"]["splits"] = list(job.key_parts["settings"]["splits"])
    meta["added_splits"] = meta.get("added_splits", []) + [{"splits": list(job.examples), "at": now()}]
    return meta


def _write(job: _Job, metadata: dict):
    """Every rank writes its share; rank 0 then finishes the store. Returns this rank's (closed) writer."""
    ranks = job.ranks
    with process_group(ranks, job.device):
        barrier(ranks)  # every rank has looked at --out before rank 0 replaces or resumes it
        writer, computed, t0 = _write_share(job, metadata)
        reports = gather(ranks, {**writer.report(), "computed": computed})
        if ranks.main:
            _finish(job, writer, reports, time.perf_counter() - t0)
        barrier(ranks)  # the other ranks return once the store is complete
    return writer


def _write_share(job: _Job, metadata: dict):
    """Lay the store out (rank 0) or open it (the others), then run this rank's windows: (writer, examples the
    teacher ran on, when the work started)."""
    config, ranks = job.config, job.ranks
    writer = None
    try:
        if ranks.main:
            writer = open_writer(config.out, config.overwrite, metadata, config.format, resume=job.resuming,
                                 extend=job.extend is not None)
            _create_splits(job, writer)
        barrier(ranks)  # the layout is on disk before the other ranks open it
        if writer is None:
            writer = attach_writer(config.out)
            _create_splits(job, writer)  # opens the arrays rank 0 created
        t0 = time.perf_counter()
        plan = broadcast(ranks, _plan(job, writer) if ranks.main else None)
        try:
            return writer, _run_share(job, writer, plan), t0
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {writer.durable_examples():,} of {job.total:,} examples are durable "
                              f"in {config.out}; run the same command with --resume to continue") from None
    except Exception as e:
        # bad input (or a bug it set off) is not worth resuming; a failing disk or network leaves the store
        # unfinished and resumable, as it does after the first chunk (docs/ERRORS.md)
        # (an extended store is never removed: what it held stays as it was, the new split unlisted)
        if writer is not None and not job.resuming and job.extend is None and not ranks.many and \
                not isinstance(e, (Interrupted, OSError)):
            _discard_unstarted(writer)
        raise
    finally:
        if writer is not None:
            writer.close()  # the lock; after a failure the store stays unfinished and resumable


def _log_done(job: _Job, writer) -> None:
    config, ranks = job.config, job.ranks
    if job.extend is not None:
        log(f"added {', '.join(f'{s} ({len(e):,} examples)' for s, e in job.examples.items())} to {config.out} in "
            f"{writer.metadata['added_splits'][-1]['dump_seconds']:.1f}s; what it held is unchanged")
        return
    log(f"wrote {job.total:,} examples ({', '.join(f'{s} {len(e):,}' for s, e in job.examples.items())}) to "
        f"{config.out} in {writer.metadata['dump_seconds']:.1f}s; teacher {job.num_layers} layers x {job.hidden}"
        + (f"; {ranks.world} ranks" if ranks.many else ""))
    log(f"next: pkd-cache distill --store {config.out} --student-layers {max(1, job.num_layers // 2)} "
        f"--output-dir student/")


def _probe(job: _Job) -> None:
    """Tokenise and run the teacher on a couple of examples of each split with the dump's settings, so that a
    setting that only fails once the work has started fails before `--out` is created or replaced."""
    config = job.config
    int8 = config.dtype == "int8"
    for ex in job.examples.values():
        tokens = tokenize(job.tokenizer, ex, 0, min(2, len(ex)), config.max_seq_length)
        _, cls = run_chunk(job.model, tokens, config.batch_size, bucketed=not config.pad_to_max_length,
                           cls_dtype=np.dtype(np.float32 if int8 else config.dtype), device=job.device,
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


def _create_splits(job: _Job, writer) -> None:
    for split, ex in job.examples.items():
        shapes = _split_arrays(job, len(ex))
        writer.create_split(split, shapes, {"source": source_name(ex.source),
                                            "data_fingerprint": job.key_parts["data"][split]})


def _split_arrays(job: _Job, n: int) -> dict:
    """{array: (shape, dtype)} of a split of `n` examples (every array kind it holds, store/arrays/)."""
    config, task = job.config, job.task
    return split_arrays(n, config.max_seq_length, task.num_labels, job.num_layers, job.hidden, config.dtype,
                        "float32" if task.is_regression else "int64", job.extras)


def _plan(job: _Job, writer) -> dict:
    """Rank 0's plan: {split: {"durable": chunks already written, "shares": each rank's windows}}. A window with
    nothing left to write is left out; one with some chunks left is recomputed whole (the same batches)."""
    config, world = job.config, job.ranks.world
    plan = {}
    for split, ex in job.examples.items():
        durable = writer.load_durable(split)
        windows = [w for w in sort_windows(len(ex), config.chunk_size, config.sort_window)
                   if any(a // config.chunk_size not in durable for a, _ in chunk_ranges(*w, config.chunk_size))]
        costs = [float(w[1] - w[0]) for w in windows]
        if world > 1:  # balanced by the teacher's padded tokens, not by examples
            lengths = tokenize_lengths(job.tokenizer, ex, config.max_seq_length)
            costs = [float(window_tokens(lengths[a:b], config.batch_size, config.max_seq_length,
                                         not config.pad_to_max_length)) for a, b in windows]
        plan[split] = {"durable": sorted(durable), "shares": share_windows(windows, costs, world)}
    return plan


def _run_share(job: _Job, writer, plan: dict) -> int:
    """Run the teacher over this rank's windows; the background writer writes their chunks not yet durable.
    Returns the examples written."""
    config, ranks = job.config, job.ranks
    computed = 0
    with stop_on_sigterm():
        # room for a whole window's chunks: the teacher runs the next window while this one is written
        background = BackgroundWriter(writer, depth=max(2, config.sort_window // config.chunk_size))
        try:
            for split, ex in job.examples.items():
                durable = set(plan[split]["durable"])
                writer.durable.setdefault(split, set()).update(durable)
                windows = plan[split]["shares"][ranks.rank]
                label = f"dump {split}" + (f" ({ranks})" if ranks.many else "")
                with progress_bar(sum(b - a for a, b in windows), label) as bar:
                    for start, stop in windows:
                        computed += _run_window(job, background, split, ex, (start, stop), durable)
                        bar.advance(stop - start)
                        release_free_memory()
        finally:
            background.close()  # drains the queue (what is queued becomes durable); re-raises a write error
    return computed


def _run_window(job: _Job, background: BackgroundWriter, split: str, ex, window: tuple[int, int],
                durable: set) -> int:
    """Tokenise one sort window, run the teacher on it, queue its chunks not yet durable; the examples queued."""
    config, (start, stop) = job.config, window
    int8 = config.dtype == "int8"
    cls_dtype = np.dtype(np.float32 if int8 else config.dtype)  # int8 is quantised from float32 below
    todo = [c for c in chunk_ranges(start, stop, config.chunk_size) if c[0] // config.chunk_size not in durable]
    holds = _split_arrays(job, len(ex))
    part = ex.take(slice(start, stop))
    texts = text_hashes(part.text_a, part.text_b)
    if job.donor is None:
        tokens = _tokenize(job, part)
        logits, cls = _run_teacher(job, tokens, cls_dtype)
        arrays = {**tokens, "logits": logits, "cls": cls}  # the writer derives example_hash
    else:
        arrays = window_arrays(job.donor, texts, lambda rows: _tokenize(job, part.take(rows)),
                               lambda tokens: _run_teacher(job, tokens, cls_dtype), cls_dtype)
    arrays["labels"], arrays[TEXT_HASH] = part.labels, texts
    arrays = {k: v for k, v in arrays.items() if k in holds}  # a store begun by an older version lacks newer extras
    queued = 0
    for a, b in todo:
        chunk = {k: v[a - start:b - start] for k, v in arrays.items()}
        if int8:
            chunk["cls"], chunk["cls_scale"] = quantize_int8(chunk["cls"])
        background.put(split, a, with_derived(chunk, holds))
        queued += b - a
    return queued


def _tokenize(job: _Job, ex) -> dict[str, np.ndarray]:
    """The token arrays of `ex`, tokenised a chunk at a time: the tokenizer's per-example objects never exist for a
    whole window (same arrays either way; benchmarks/RESULTS.md, B6)."""
    size, width = job.config.chunk_size, job.config.max_seq_length
    parts = [tokenize(job.tokenizer, ex, a, min(a + size, len(ex)), width) for a in range(0, len(ex), size)]
    return {k: np.concatenate([t[k] for t in parts]) for k in parts[0]}


def _run_teacher(job: _Job, tokens: dict, cls_dtype) -> tuple[np.ndarray, np.ndarray]:
    """(logits, cls) of the teacher on `tokens`."""
    config = job.config
    return run_chunk(job.model, tokens, config.batch_size, bucketed=not config.pad_to_max_length,
                     cls_dtype=cls_dtype, device=job.device, precision=config.precision)


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


def _finish(job: _Job, writer, reports: list[dict], seconds: float) -> None:
    """Rank 0: every rank's checksums into the manifest, then (only if every chunk is durable) the complete flag."""
    config = job.config
    writer.merge(reports)
    for split, ex in job.examples.items():
        missing = sorted(set(range(-(-len(ex) // config.chunk_size))) - writer.durable.get(split, set()))
        if missing:
            raise PkdCacheError(f"{config.out}: chunks {missing[:5]} of {split} were not written; run the same "
                                f"command with --resume to finish the store")
    computed = sum(r["computed"] for r in reports)
    if job.resuming:
        kept = job.total - computed
        log(f"resumed {config.out}: {kept:,} examples were durable already, the teacher ran on {computed:,}")
        writer.metadata["resumptions"][-1] = {"at": writer.metadata["resumptions"][-1], "kept_examples": kept,
                                              "computed_examples": computed}
    if job.extend is not None:
        writer.metadata["added_splits"][-1]["dump_seconds"] = round(seconds, 3)
    else:
        writer.metadata["dump_seconds"] = round(seconds, 3)  # tokenise + forward + write, all splits
    if job.ranks.many:
        writer.metadata["dump_ranks"] = job.ranks.world
    writer.finish()
