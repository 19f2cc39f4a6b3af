"""Plain-text corpora for causal-LM caches (`--task lm`): loading, tokenising into ragged sequences, and the
token-budget batches a student trains on.

Files (`load_corpus`), read in the order given: `.txt` is one document per line, as the `text` builder of `datasets`
reads it (universal newlines, the line break removed) except that blank lines (empty or only whitespace) are left out
where `datasets` keeps them as empty examples; `.jsonl`/`.json` is JSON Lines with the document in field
`text_column`; `.parquet` has it in column `text_column`; a name that is no file here is a hub dataset
`name[:config][/split]` (split `train` by default).

Sequences (`tokenize_corpus`), by `mode`:
- "pack": the documents are concatenated, each followed by the tokenizer's eos token (when it has one and has not
  added it already), and the stream is cut into sequences of exactly `max_seq_length` tokens, as `group_texts` in
  transformers' run_clm.py does, except that the short remainder is kept as a last, shorter sequence (run_clm drops
  it). A sequence may start or end inside a document.
- "cut": each document is a sequence; tokens past `max_seq_length` are dropped (`truncated` counts such documents).
- "none" (cutting off): each document is a sequence; one longer than `max_seq_length` is refused.
The tokenizer adds its default special tokens (GPT-2: none; Llama: BOS before each document), kept as any other
token; only "pack" adds eos. Documents with no tokens besides those the tokenizer adds are dropped (`dropped`).

Layout: token-major and ragged, only real tokens, never padding. `input_ids` is flat (dtype `id_dtype`: the smallest
unsigned type that holds the vocabulary) and sequence i is `input_ids[offsets[i]:offsets[i + 1]]`.

Causal alignment: the teacher's output at position t of a sequence predicts token t + 1 of that sequence. The store
keeps an output for every position, the last one included, so that outputs share `offsets` with `input_ids` (and
hidden-state losses use every position); the last position of a sequence has no target and the token loss masks it
(`shift_for_causal_lm` gives it target IGNORE). Packed sequences are independent too: the last token of sequence i
does not predict the first of sequence i + 1.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import PkdCacheError

MODES = ("pack", "cut", "none")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
IGNORE = -100  # the target of a position that predicts nothing (the last of each sequence)
_LOCAL_LOOKING = FILE_SUFFIXES + (".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".arrow")
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?::(?P<config>[\w.-]+))?"
                       r"(?:/(?P<split>[\w.-]+(?:\[[^\]]*\])?))?$")
_SPLIT_NAME = re.compile(r"^(train|validation|valid|dev|test)(\[[^\]]*\])?$")


@dataclass
class Corpus:
    """The documents, in order, and where each came from (for error messages and metadata)."""

    documents: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # one per input file or hub dataset
    starts: list[int] = field(default_factory=list)  # index of the first document of each source
    units: list[str] = field(default_factory=list)  # "line" (1-based, text files) or "row" (0-based, tables)
    positions: list[int] = field(default_factory=list)  # each document's line or row in its source

    def __len__(self) -> int:
        return len(self.documents)

    def where(self, i: int) -> str:
        s = bisect.bisect_right(self.starts, i) - 1
        return f"{self.sources[s]} {self.units[s]} {self.positions[i]}"

    def fingerprint(self) -> str:
        """sha256 of the documents and their boundaries, independent of file names and formats."""
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(doc.encode())
            h.update(b"\x1e")
        return h.hexdigest()


def load_corpus(data_files: list[str], text_column: str = "text", max_documents: Optional[int] = None) -> Corpus:
    """The documents of `data_files` (the first `max_documents` of them all); an empty corpus is an error."""
    if not data_files:
        raise PkdCacheError("no data files given (--data-files)")
    if max_documents is not None and max_documents <= 0:
        raise PkdCacheError(f"the number of documents to take must be > 0, got {max_documents}")
    corpus = Corpus()
    for name in data_files:
        if max_documents is not None and len(corpus) >= max_documents:
            break
        left = None if max_documents is None else max_documents - len(corpus)
        source, unit, rows = _open(name, text_column, left)
        corpus.sources.append(source), corpus.starts.append(len(corpus)), corpus.units.append(unit)
        try:
            for pos, text in rows:
                corpus.documents.append(text), corpus.positions.append(pos)
                if max_documents is not None and len(corpus) >= max_documents:
                    break
        except PkdCacheError:
            raise
        except Exception as e:  # OSError, UnicodeDecodeError, pyarrow's own types for broken files
            raise PkdCacheError(f"{source}: cannot read: {e}") from e
    if not corpus.documents:
        raise PkdCacheError(f"{', '.join(map(str, data_files))}: the corpus is empty (no documents)")
    return corpus


def _open(name: str, column: str, limit: Optional[int]) -> tuple[str, str, Iterator[tuple[int, str]]]:
    path = Path(name).expanduser()
    if path.is_dir():
        raise PkdCacheError(f"{name} is a directory; name the files (.txt, .jsonl, .json or .parquet)")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return str(path), "line", _read_txt(path)
        if suffix in (".jsonl", ".json"):
            return str(path), "line", _read_jsonl(path, column)
        if suffix == ".parquet":
            return str(path), "row", _read_parquet(path, column)
        raise PkdCacheError(f"{path}: unsupported file type {suffix or '(none)'}; use .txt, .jsonl, .json or .parquet")
    m = _HUB_NAME.match(name)
    if m is None or Path(m["repo"]).suffix.lower() in _LOCAL_LOOKING:
        raise PkdCacheError(f"{name}: no such file (nor a hub dataset name: name[:config][/split])")
    repo, config, split = m["repo"], m["config"], m["split"]
    if config is None and split is None and "/" in repo and _SPLIT_NAME.match(repo.rsplit("/", 1)[1]):
        repo, split = repo.rsplit("/", 1)  # "wikitext/train": a dataset and its split, not owner/name
    return f"hub:{name}", "row", _read_hub(name, repo, config, split or "train", column, limit)


def _read_txt(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8-sig") as f:  # universal newlines, as `datasets` reads text
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line[:-1] if line.endswith("\n") else line


def _read_jsonl(path: Path, column: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (a JSON array? expected JSON Lines: one object per line)" if line.lstrip()[:1] == "[" else ""
                raise PkdCacheError(f"{path} line {lineno}: not valid JSON ({e.msg}){hint}") from e
            if not isinstance(row, dict):
                raise PkdCacheError(f"{path} line {lineno}: expected one JSON object per line (JSON Lines), "
                                    f"got a {type(row).__name__}")
            if column not in row:
                raise PkdCacheError(f"{path} line {lineno}: no field {column!r} (found: {', '.join(map(str, row))}); "
                                    f"pass --text-column")
            yield lineno, _text(row[column], f"{path} line {lineno}", column)


def _read_parquet(path: Path, column: str) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises its own types for broken files
        raise PkdCacheError(f"{path}: cannot read: {e}") from e
    if column not in names:
        raise PkdCacheError(f"{path}: no column {column!r} (found: {', '.join(names)}); pass --text-column")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield row, _text(value, f"{path} row {row}", column)
            row += 1


def _read_hub(name: str, repo: str, config: Optional[str], split: str, column: str,
              limit: Optional[int]) -> Iterator[tuple[int, str]]:
    import datasets

    if limit is not None and "[" not in split:
        split = f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # no network, unknown dataset, ...: one line, with the way out
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PkdCacheError(f"{name}: not a file here, and could not load it from the Hugging Face hub: {first}. "
                            f"Offline? Pass local .txt, .jsonl or .parquet files.") from e
    if column not in ds.column_names:
        raise PkdCacheError(f"hub:{name}: no column {column!r} (found: {', '.join(ds.column_names)}); "
                            f"pass --text-column")
    for row, value in enumerate(ds[column]):
        yield row, _text(value, f"hub:{name} row {row}", column)


def _text(value, where: str, column: str) -> str:
    if value is None:
        raise PkdCacheError(f"{where}: no value in column {column!r}")
    if not isinstance(value, str):
        raise PkdCacheError(f"{where}: column {column!r} holds a {type(value).__name__}, not text")
    return value


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise PkdCacheError(f"a vocabulary of {vocab_size} tokens does not fit 64-bit ids")


@dataclass
class TokenizedCorpus:
    input_ids: np.ndarray  # flat, id_dtype(len(tokenizer)): only real tokens
    offsets: np.ndarray  # int64, num_sequences + 1: sequence i is input_ids[offsets[i]:offsets[i + 1]]
    mode: str
    truncated: int = 0  # documents cut short ("cut")
    dropped: int = 0  # documents with no tokens of their own

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def summary(self, max_seq_length: int) -> str:
        how = {"pack": f"packed into sequences of {max_seq_length} tokens (the last may be shorter)",
               "cut": f"one sequence per document, cut to {max_seq_length} tokens ({self.truncated} cut)",
               "none": f"one sequence per document, none longer than {max_seq_length} tokens"}[self.mode]
        return f"{self.num_tokens:,} tokens in {self.num_sequences:,} sequences: {how}"


def tokenize_corpus(tokenizer, corpus: Corpus, max_seq_length: int, mode: str, block: int = 1000,
                    flag: str = "--max-seq-length") -> TokenizedCorpus:
    """Token ids of the corpus as ragged sequences (see the module's docstring), `block` documents at a time."""
    if mode not in MODES:
        raise PkdCacheError(f"unknown sequence mode {mode!r}; use one of {', '.join(MODES)}")
    if max_seq_length < 2:
        raise PkdCacheError(f"{flag} {max_seq_length} is too short: a causal LM needs 2 tokens to predict one")
    vocab, specials = len(tokenizer), tokenizer.num_special_tokens_to_add(pair=False)
    dtype, eos = id_dtype(vocab), tokenizer.eos_token_id if mode == "pack" else None
    parts, lengths, truncated, dropped = [], [], 0, 0
    for a in range(0, len(corpus), block):
        enc = tokenizer(corpus.documents[a:a + block], return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)["input_ids"]
        seqs = []
        for i, ids in enumerate(enc, start=a):
            if len(ids) <= specials:
                dropped += 1
                continue
            if eos is not None and ids[-1] != eos:
                ids = ids + [eos]
            if mode != "pack" and len(ids) > max_seq_length:
                if mode == "none":
                    raise PkdCacheError(f"document {i} ({corpus.where(i)}) has {len(ids):,} tokens, more than "
                                        f"{flag} {max_seq_length}, and cutting is off; cut or pack the documents, "
                                        f"or raise {flag}")
                ids, truncated = ids[:max_seq_length], truncated + 1
            seqs.append(ids)
        if seqs:
            n = np.array([len(s) for s in seqs], dtype=np.int64)
            ids = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(n.sum()))
            if ids.min() < 0 or ids.max() >= vocab:
                raise PkdCacheError(f"the tokenizer gave id {int(ids.max())} outside its vocabulary of {vocab}")
            parts.append(ids.astype(dtype)), lengths.append(n)
    if not parts:
        raise PkdCacheError(f"{', '.join(corpus.sources)}: the corpus is empty (no document has any tokens)")
    input_ids = np.concatenate(parts)
    if mode == "pack":
        offsets = np.append(np.arange(0, len(input_ids), max_seq_length, dtype=np.int64), len(input_ids))
    else:
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    return TokenizedCorpus(input_ids, offsets, mode, truncated, dropped)


def budget_plan(offsets: np.ndarray, max_tokens: int, seed: int, epoch: int, rank: int = 0,
                world: int = 1) -> list[np.ndarray]:
    """The epoch's batches of rank `rank` of `world` (see `token_budget_batches`), as arrays of sequence indices."""
    if max_tokens < 1 or world < 1 or not 0 <= rank < world:
        raise PkdCacheError(f"bad token batching: max_tokens {max_tokens}, rank {rank} of {world}")
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    if len(lengths) and lengths.max() > max_tokens:
        i = int(np.argmax(lengths > max_tokens))
        raise PkdCacheError(f"sequence {i} has {int(lengths[i]):,} tokens, more than the {max_tokens:,} tokens of a "
                            f"batch; allow at least {int(lengths.max()):,} tokens per batch")
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    cum = np.concatenate([[0], np.cumsum(lengths[order])])
    batches, a = [], 0
    while a < len(order):  # next fit: a batch ends where the next sequence would pass the budget
        b = int(np.searchsorted(cum, cum[a] + max_tokens, side="right")) - 1
        batches.append(order[a:b])
        a = b
    keep = len(batches) - len(batches) % world  # every rank the same number of batches: the last few are left out
    return batches[rank:keep:world]


def token_budget_batches(offsets: np.ndarray, max_tokens: int, seed: int, epoch: int, rank: int = 0,
                         world: int = 1, start_batch: int = 0) -> Iterator[np.ndarray]:
    """Training batches of sequence indices: the sequences in a seeded shuffle (per `seed` and `epoch`), packed
    greedily in that order into batches of at most `max_tokens` real tokens (a longer sequence is an error).

    Rank r of `world` takes batches r, r + W, r + 2W, ...; the last `len % W` batches of the epoch are left out
    (on every rank, as the store's reader leaves out a last batch smaller than W), so that all ranks take the same
    number of steps; their sequences are seen in other epochs, where the shuffle differs. `start_batch` is the number
    of this rank's batches already taken (the optimizer steps of the epoch): a resumed run gets the rest.
    """
    if start_batch < 0:
        raise PkdCacheError(f"start batch must be >= 0, got {start_batch}")
    yield from budget_plan(offsets, max_tokens, seed, epoch, rank, world)[start_batch:]


def shift_for_causal_lm(ids: np.ndarray, offsets: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), both int64 and as long as `ids` (one sequence, or flat sequences with `offsets`):
    targets[t] = ids[t + 1], the token that the outputs at position t predict, and IGNORE at the last position of
    each sequence. These are already shifted: do not pass them as Hugging Face `labels`, which shift again."""
    inputs = np.asarray(ids).astype(np.int64)
    offsets = np.array([0, len(inputs)]) if offsets is None else np.asarray(offsets, dtype=np.int64)
    targets = np.full_like(inputs, IGNORE)
    targets[:-1] = inputs[1:]
    ends = offsets[1:][np.diff(offsets) > 0] - 1
    targets[ends] = IGNORE
    return inputs, targets
