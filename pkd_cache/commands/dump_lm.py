"""`pkd-cache dump --task lm`: a causal-LM teacher run once over a corpus, its per-token outputs written to a token
store (docs/FORMAT.md, version 2): the tokens, the sparse next-token targets of `--logits` (sample:N or topk:K) and
the hidden states of `--hidden-layers`. An encoder teacher (BERT and its kin) has no next-token logits: with
`--logits none` its store holds the tokens and hidden states, for encoder students (student/encoder.py).

The cache key (store/cache_key.py) holds the teacher's and tokenizer's files, each corpus's content, and every
setting that changes what is stored: the logit spec, its sampling seed and temperature, the hidden layers and their
dtype, the sequence length and mode, the rows' size. `dump` (commands/dump.py) uses it as for any store: a hit
returns the store, an unfinished store of the same key is resumed.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import DumpConfig, to_dict
from ..data.corpus import TokenizedCorpus, id_dtype, load_corpus, tokenize_corpus
from ..errors import Interrupted, PkdCacheError
from ..identity import model_identity, tokenizer_identity
from ..logit_spec import LogitSpec
from ..distributed import Ranks, barrier, broadcast, gather, process_group, rank_device, ranks_from_env
from ..progress import log, progress_bar, quiet
from ..store.format import TOKEN_FORMAT_VERSION, split_arrays
from ..store.token_targets import slot_bytes
from ..store.worker import Consumer, InlineConsumer, pool_threads
from ..store.writer import attach_writer, open_writer
from ..teacher.lm_head import SplitHead, split_head
from .dump_lm_rows import RowAssembler, RowSpec, encode, needs_run, rows_of, teacher_batches, teacher_outputs
from .interrupt import stop_on_sigterm

SPLITS = {"train": "data_files", "validation": "validation_files"}  # split -> the DumpConfig field of its corpus


def load_corpora(config: DumpConfig) -> dict:
    """{split: Corpus} of the dump: `--data-files` as train, `--validation-file` as validation."""
    return {split: load_corpus(getattr(config, field), config.text_column, config.max_examples)
            for split, field in SPLITS.items() if getattr(config, field)}


def lm_key_parts(config: DumpConfig, corpora: dict) -> dict:
    """The cache key's parts of a token store: the teacher and tokenizer from their files, each corpus's content, and
    what changes the stored values or their layout."""
    spec = LogitSpec.parse(config.logits)
    settings = {"task": "lm", "max_seq_length": config.max_seq_length, "sequence_mode": config.sequence_mode,
                "logits": str(spec), "hidden_layers": sorted(config.hidden_layers or []),
                "chunk_tokens": config.chunk_tokens, "precision": config.precision, "format": config.format,
                "format_version": TOKEN_FORMAT_VERSION, "splits": list(corpora)}
    if spec.kind != "none":
        settings["temperature"] = config.temperature
    if spec.kind == "sample":
        settings["sample_seed"] = config.sample_seed
    if config.hidden_layers:
        settings["dtype"] = config.dtype
    return {"teacher": model_identity(config.teacher), "tokenizer": tokenizer_identity(config.teacher),
            "data": {s: c.fingerprint() for s, c in corpora.items()}, "settings": settings}


def run_lm_dump(config: DumpConfig, corpora: dict, key_parts: dict, key: str, resuming: bool):
    """Load the teacher, tokenise the corpora and write the token store at `config.out`; returns it opened."""
    from transformers import AutoTokenizer

    from ..store.fingerprint import vocab_fingerprint, weights_fingerprint
    from ..training import resolve_device

    ranks = ranks_from_env()
    if ranks.many and config.format != "zarr":
        raise PkdCacheError("a multi-rank dump writes zarr stores only; run --format arrow as one process")
    model = _load_teacher(config)
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    rows = _row_spec(config, model)
    device = rank_device(ranks, resolve_device(config.device))
    model.to(device).eval()
    tokenized = {}
    for split, corpus in corpora.items():
        tokenized[split] = tokenize_corpus(tokenizer, corpus, config.max_seq_length, config.sequence_mode)
        if ranks.main:
            log(f"{split}: {tokenized[split].summary(config.max_seq_length)}")
    teacher = {"name_or_path": config.teacher, "model_type": model.config.model_type,
               "architecture": type(model).__name__, "num_layers": model.config.num_hidden_layers,
               "hidden_size": model.config.hidden_size, "weights_fingerprint": weights_fingerprint(model),
               "identity": key_parts["teacher"], "config": json.loads(model.config.to_json_string())}
    spec = rows.spec
    kind = _teacher_kind(model)
    metadata = {
        "layout": "tokens", "teacher": teacher,
        "tokenizer": {"name_or_path": config.teacher, "class": type(tokenizer).__name__, "vocab_size": rows.vocab,
                      "vocab_fingerprint": vocab_fingerprint(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                      "eos_token_id": tokenizer.eos_token_id},
        "task": {"name": "lm", "num_labels": rows.vocab, "is_regression": False},
        "max_seq_length": config.max_seq_length, "cls_dtype": rows.hidden_dtype, "chunk_size": 1,
        "lm": {"chunk_tokens": rows.chunk_tokens, "id_dtype": rows.id_dtype, "sequence_mode": config.sequence_mode,
               "targets": {"kind": spec.kind, **({"count": spec.count, "seed": rows.seed,
                                                  "temperature": rows.temperature} if spec.kind != "none" else {})},
               "target_slot": rows.slot, "target_parts": spec.parts, "hidden_layers": list(rows.hidden_layers),
               "hidden_dtype": rows.hidden_dtype, "teacher_kind": kind,
               "alignment": ALIGNMENT[kind]},
        "settings": to_dict(config), "cache_key": key, "cache_key_parts": key_parts,
    }
    splits = {split: (_arrays(rows, model, tok, metadata["lm"]), {
        "num_tokens": tok.num_tokens, "num_sequences": tok.num_sequences, "data_fingerprint": key_parts["data"][split],
        "source": ", ".join(corpora[split].sources)}) for split, tok in tokenized.items()}
    t0 = time.perf_counter()
    with process_group(ranks, device), quiet(not ranks.main):
        _write(config, _Run(model, rows, device, ranks, _split_head(config, model, rows, tokenized, device)),
               tokenized, metadata, splits, resuming)
    total = sum(t.num_tokens for t in tokenized.values())
    if ranks.main:
        log(f"wrote {total:,} tokens ({', '.join(f'{s} {t.num_tokens:,}' for s, t in tokenized.items())}) to "
            f"{config.out} in {time.perf_counter() - t0:.1f}s; logits {spec}"
            + (f", hidden layers {list(rows.hidden_layers)} ({rows.hidden_dtype})" if rows.hidden_layers else "")
            + (f"; {ranks.world} ranks" if ranks.many else ""))
        log(f"next: pkd-cache distill --store {config.out} --student-init {config.teacher} --student-layers "
            f"{max(1, model.config.num_hidden_layers // 2)}"
            f"{' --beta 1' if spec.kind == 'none' and rows.hidden_layers else ''} "
            f"--output-dir student/")
    from ..store.reader import open_store

    return open_store(config.out)


@dataclass(frozen=True)
class _Run:
    """What runs the teacher on this process: the model, the rows' contents, the device, this rank of the dump."""

    model: object
    rows: RowSpec
    device: object
    ranks: Ranks
    split: Optional[SplitHead] = None  # the head run a block of positions at a time (teacher/lm_head.py)


def _split_head(config: DumpConfig, model, rows: RowSpec, tokenized: dict, device) -> Optional[SplitHead]:
    """The teacher's body and head, where running them apart gives its logits on the corpus's first sequence."""
    tok = next((t for t in tokenized.values() if t.num_sequences), None)
    if rows.spec.kind == "none" or tok is None:
        return None
    probe = torch.from_numpy(tok.input_ids[int(tok.offsets[0]):int(tok.offsets[1])].astype(np.int64))[None]
    return split_head(model, probe.to(device), config.precision)


def _write(config: DumpConfig, run: _Run, tokenized: dict, metadata: dict, splits: dict, resuming: bool) -> None:
    """Lay the store out (rank 0) or open it (the others), run the teacher over this rank's rows, then (rank 0)
    gather every rank's checksums and finish the store.

    Under torchrun rank r of W writes rows [r n / W, (r + 1) n / W) of each split: the rows of the other ranks are
    skipped as a resumed dump skips its durable rows, so each teacher batch is the one-process dump's and the store
    is byte for byte the same. A batch that straddles two ranks' rows runs on both."""
    ranks, sink, discard = run.ranks, None, False
    t0 = time.perf_counter()
    try:
        barrier(ranks)  # every rank has looked at --out before rank 0 replaces or resumes it
        if ranks.main:
            sink = open_writer(config.out, config.overwrite, metadata, config.format, resume=resuming)
        barrier(ranks)  # the layout is on disk before the other ranks open it
        if sink is None:
            sink = attach_writer(config.out)
        for split, (arrays, split_meta) in splits.items():
            sink.create_split(split, arrays, split_meta)
        durable = broadcast(ranks, {s: sorted(sink.load_durable(s)) for s in splits} if ranks.main else None)
        with stop_on_sigterm():
            for split, tok in tokenized.items():
                n = _row_count(tok, run.rows)
                mine = range(ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world)
                skip = set(durable[split]) | (set(range(n)) - set(mine))
                sink.durable.setdefault(split, set()).update(durable[split])
                _dump_split(config, run, sink, split, tok, skip)
        reports = gather(ranks, sink.report())
        if ranks.main:
            _finish(config, sink, reports, tokenized, run, time.perf_counter() - t0)
        barrier(ranks)  # the other ranks return once the store is complete
    except KeyboardInterrupt:
        rows = sum(len(d) for d in sink.durable.values()) if sink is not None else 0
        raise Interrupted(f"interrupted: {rows:,} rows are durable in {config.out}; run the same command with "
                          f"--resume to continue") from None
    except Exception as e:
        # bad input (or a bug) before the first durable row: the fresh store is ours and holds nothing to resume
        discard = sink is not None and not resuming and not ranks.many and not any(sink.durable.values()) and \
            not isinstance(e, OSError)
        raise
    finally:
        if discard:
            sink.location.remove_all()  # still under our lock
        if sink is not None:
            sink.close()


def _finish(config: DumpConfig, sink, reports: list[dict], tokenized: dict, run: _Run, seconds: float) -> None:
    """Rank 0: every rank's checksums into the manifest, then (only if every row is durable) the complete flag."""
    sink.merge(reports)
    for split, tok in tokenized.items():
        missing = sorted(set(range(_row_count(tok, run.rows))) - sink.durable.get(split, set()))
        if missing:
            raise PkdCacheError(f"{config.out}: rows {missing[:5]} of {split} were not written; run the same command "
                                f"with --resume to finish the store")
    sink.metadata["dump_seconds"] = round(seconds, 3)
    if run.ranks.many:
        sink.metadata["dump_ranks"] = run.ranks.world
    sink.finish()


# lm.alignment: what the outputs stored at position t of a sequence are, by lm.teacher_kind (docs/FORMAT.md)
ALIGNMENT = {"causal-lm": "the outputs at position t predict token t + 1",
             "encoder": "the hidden states at position t are token t's, the encoder seeing the whole sequence"}


def _teacher_kind(model) -> str:
    from ..student.encoder import model_kind

    return "encoder" if model_kind(model.config) == "encoder" else "causal-lm"


def _load_teacher(config: DumpConfig):
    """The causal LM, or with `--logits none --hidden-layers ...` an encoder, whose per-token outputs are dumped."""
    from ..student.causal_lm import load_causal_lm
    from ..models import load_config
    from ..student.encoder import load_encoder, model_kind

    model_config = load_config(config.teacher)
    if model_kind(model_config) != "encoder":
        return load_causal_lm(config.teacher)  # a causal LM, or one line saying what it is instead
    spec, kind = LogitSpec.parse(config.logits), getattr(model_config, "model_type", "?")
    if spec.kind != "none":
        raise PkdCacheError(f"{config.teacher} is a {kind} model, not a causal LM (decoder-only, "
                            f"AutoModelForCausalLM): --logits {spec} needs one (an encoder's hidden states alone: "
                            f"--logits none --hidden-layers ...)")
    if not config.hidden_layers:
        raise PkdCacheError(f"{config.teacher} is an encoder ({kind}) and --logits is none: pass --hidden-layers "
                            f"(e.g. all of them for TinyBERT-style students), or there is nothing to distil from")
    return load_encoder(config.teacher)


def _row_spec(config: DumpConfig, model) -> RowSpec:
    """The rows' contents, once the teacher is known: its vocabulary bounds K and N, its layers --hidden-layers."""
    head = model.get_output_embeddings()
    vocab = int(getattr(head, "out_features", 0) or model.config.vocab_size)
    spec = LogitSpec.parse(config.logits)
    spec.check(vocab)
    layers = model.config.num_hidden_layers
    bad = [h for h in config.hidden_layers or [] if not 0 <= h <= layers]
    if bad:
        raise PkdCacheError(f"--hidden-layers {bad[0]} is out of range: the teacher has {layers} layers (0 = the "
                            f"embeddings, 1..{layers} the blocks' outputs)")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if isinstance(limit, int) and config.max_seq_length > limit:
        raise PkdCacheError(f"--max-seq-length {config.max_seq_length} is longer than the teacher's {limit} "
                            f"positions")
    hidden = tuple(sorted(set(config.hidden_layers or [])))
    return RowSpec(config.chunk_tokens, spec, vocab, slot_bytes(spec, vocab, config.chunk_tokens), hidden,
                   config.dtype if hidden else "float16", str(id_dtype(vocab)), config.sample_seed,
                   float(config.temperature))


def _row_count(tok: TokenizedCorpus, rows: RowSpec) -> int:
    """Rows of C tokens a split's token stream fills (the last may be part full)."""
    return -(-tok.num_tokens // rows.chunk_tokens)


def _arrays(rows: RowSpec, model, tok: TokenizedCorpus, lm: dict) -> dict:
    """The split's arrays, as the metadata's `lm` entry sizes them (the same entry a reader checks)."""
    return split_arrays(_row_count(tok, rows), 0, rows.vocab, model.config.num_hidden_layers, model.config.hidden_size,
                        rows.hidden_dtype, "int64", (), lm)


def _cores_busy(device) -> bool:
    """Whether the teacher runs on the CPU with a torch thread on every core this process may use: then a writer
    thread would only preempt it (store/worker.py's InlineConsumer)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.device(device).type == "cpu" and torch.get_num_threads() >= cores


def _dump_split(config: DumpConfig, run: _Run, sink, split: str, tok: TokenizedCorpus, durable: set) -> None:
    """Run the teacher over one split's batches that touch a row not in `durable` (rows written already, or another
    rank's); each such row is coded on a pool of threads and written in order on another, or coded and written
    between batches where the teacher keeps every core busy (`_cores_busy`)."""
    model, rows, device = run.model, run.rows, run.device
    ids = tok.input_ids.astype(np.int64)
    assembler = RowAssembler(rows.chunk_tokens)
    if _cores_busy(device):
        pool, writer = None, InlineConsumer(lambda item: sink.write(split, item[0], encode(rows, item[1])))
    else:  # rows are coded side by side on a pool (the C packer releases the GIL), then written in order
        threads = pool_threads()
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pkd-cache-coder")
        writer = _PooledCoding(Consumer(lambda item: sink.write(split, item[0], item[1].result()), 2 * threads,
                                        "pkd-cache-writer"), pool, rows)
    try:
        with progress_bar(tok.num_tokens, f"dump lm {split}", unit="tok") as bar:
            for batch in teacher_batches(tok.offsets, config.batch_size):
                start, stop = int(tok.offsets[batch[0]]), int(tok.offsets[batch[1]])
                if not needs_run(rows_of(start, stop, rows.chunk_tokens), durable):
                    assembler.skip_to(stop)
                else:
                    assembler.add(start, teacher_outputs(model, ids, tok.offsets, batch, rows, device,
                                                         config.precision, run.split))
                    for r, row in assembler.rows():
                        if r not in durable:
                            writer.put((r, row))
                bar.advance(stop - start)
            for r, row in assembler.rows(final=True):
                if r not in durable:
                    writer.put((r, row))
    finally:
        try:
            writer.close()  # what is queued is written (durable); a coding or write error is raised here
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


class _PooledCoding:
    """The writer's `put((row index, row))`, the row's coding submitted to `pool` first: the writer thread then
    writes each row's coded arrays in order, as they come."""

    def __init__(self, writer: Consumer, pool: ThreadPoolExecutor, rows: RowSpec):
        self.writer, self.pool, self.rows = writer, pool, rows

    def put(self, item: tuple) -> None:
        self.writer.raise_error()
        self.writer.put((item[0], self.pool.submit(encode, self.rows, item[1])))

    def close(self) -> None:
        self.writer.close()
