"""Typed configs shared by the CLI and the Python API.

Each CLI command builds exactly one of these and hands it to the matching function
(`finetune`, `dump`, `distill`, `evaluate`), so the two front ends cannot drift apart.
Defaults follow the PKD paper (Sun et al., 2019) and Hugging Face `run_glue.py`.

Every numeric field carries its legal range in its metadata (`num(...)`), and `check_numbers` checks them all in
one place: type, finiteness (nan and inf parse as floats and would train a NaN model or crash deep inside) and
range, each message naming the CLI flag.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .errors import PkdCacheError

INT_MAX = 2**31 - 1  # counts beyond this are typos, and overflow int32 index maths further down
CLS_DTYPES = ("float16", "float32", "int8")  # how a store keeps [CLS] vectors (int8: plus a per-row `cls_scale`)


@dataclass(frozen=True)
class Range:
    """The legal values of a numeric field: lo < v (lo <= v when lo_closed), v < hi (v <= hi when hi_closed)."""

    lo: Optional[float] = None
    lo_closed: bool = False
    hi: Optional[float] = None
    hi_closed: bool = True
    integer: bool = False
    optional: bool = False  # None is allowed (it means "not set")
    also: Optional[int] = None  # one more legal value outside the range, e.g. max_steps = -1 (no limit)
    also_means: str = ""
    cap: Optional[int] = None  # a sanity bound on counts, kept out of the range's text

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'[' if self.lo_closed else '('}{self.lo:g}, {self.hi:g}{']' if self.hi_closed else ')'}"
        elif self.lo is not None:
            text = f"{'>=' if self.lo_closed else '>'} {self.lo:g}"
        else:
            text = f"{'<=' if self.hi_closed else '<'} {self.hi:g}"
        return text + (f" (or {self.also}: {self.also_means})" if self.also is not None else "")

    def contains(self, v) -> bool:
        if self.also is not None and v == self.also:
            return True
        if self.lo is not None and (v < self.lo or (v == self.lo and not self.lo_closed)):
            return False
        return self.hi is None or v < self.hi or (v == self.hi and self.hi_closed)


def num(default, flag: Optional[str] = None, **limits):
    """A numeric dataclass field with its legal `Range`; `flag` is its CLI option without the leading dashes
    (default: the field name with - for _)."""
    return field(default=default, metadata={"range": Range(**limits), "flag": flag})


def positive_int(default, optional: bool = False):
    return num(default, lo=0, integer=True, cap=INT_MAX, optional=optional)


def check_numbers(config, prefix: str = "--", flags: Optional[dict[str, str]] = None) -> None:
    """Check every `num` field of `config`. `prefix` goes before each flag name (dump's fine-tuning options are
    --finetune-...); `flags` overrides whole flags by field name (dump's fine-tuning seed is plain --seed)."""
    for f in fields(config):
        limits = f.metadata.get("range")
        if limits is not None:
            flag = (flags or {}).get(f.name) or prefix + (f.metadata["flag"] or f.name.replace("_", "-"))
            check_number(getattr(config, f.name), limits, flag)


def check_number(v, limits: Range, flag: str) -> None:
    if v is None and limits.optional:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral if limits.integer else numbers.Real):
        kind = "an integer" if limits.integer else "a number"
        raise PkdCacheError(f"{flag} must be {kind} {limits.text()}, got {v!r}")
    if not limits.integer and not math.isfinite(v):
        raise PkdCacheError(f"{flag} must be a finite number {limits.text()}, got {v}")
    if not limits.contains(v):
        raise PkdCacheError(f"{flag} must be {limits.text()}, got {v}")
    if limits.cap is not None and v > limits.cap:
        raise PkdCacheError(f"{flag} must be <= {limits.cap}, got {v}")


def check_device(name: Optional[str], flag: str = "--device") -> None:
    """A device this machine has, or one line: a malformed name, a backend torch lacks here, an index beyond the
    device count. Checked before any work (torch would otherwise assert or fail deep inside a forward)."""
    if not name:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise PkdCacheError(f"{flag} {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise PkdCacheError(f"{flag} {name}: there is one cpu device; use --device cpu")
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PkdCacheError(f"{flag} {name}: CUDA is not available here (no GPU, or torch built without CUDA); "
                                f"use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PkdCacheError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise PkdCacheError(f"{flag} {name}: MPS (Apple GPU) is not available here; use --device cpu")
        return
    raise PkdCacheError(f"{flag} {name}: pkd-cache runs on cpu, cuda, cuda:N or mps, not {device.type}")


@dataclass
class TrainConfig:
    """Optimiser and schedule settings shared by fine-tuning and distillation."""

    epochs: float = num(4.0, lo=0)
    learning_rate: float = num(2e-5, lo=0)
    # examples per optimiser step, over all ranks (the global batch). None: DEFAULT_BATCH_SIZE, or in distill
    # per_device_train_batch_size x ranks x gradient_accumulation_steps when those are given (resolve_batch)
    batch_size: Optional[int] = positive_int(None, optional=True)
    weight_decay: float = num(0.01, lo=0, lo_closed=True)
    warmup_ratio: float = num(0.1, lo=0, lo_closed=True, hi=1, hi_closed=False)
    max_grad_norm: float = num(1.0, lo=0, lo_closed=True)  # 0: no clipping
    seed: int = num(0, lo=0, lo_closed=True, cap=2**32 - 1, integer=True)  # numpy's legacy seeds stop at 2**32
    logging_steps: int = num(50, lo=0, lo_closed=True, cap=INT_MAX, integer=True)  # 0: no log lines
    # > 0 stops after this many optimiser steps (smoke runs, benchmarks)
    max_steps: int = num(-1, lo=0, cap=INT_MAX, integer=True, also=-1, also_means="no limit")
    # distill: > 0 also checkpoints every N steps (it always does after each epoch)
    save_steps: int = num(0, lo=0, lo_closed=True, cap=INT_MAX, integer=True)
    lr_scheduler_type: str = "linear"  # after the warm-up: linear | cosine (to 0) | constant_with_warmup
    eval_strategy: str = "epoch"  # when the dev sets are scored: epoch | steps (every eval_steps) | no (at the end)
    eval_steps: Optional[int] = positive_int(None, optional=True)  # with eval_strategy steps (default: logging_steps)
    # the dev metric the best checkpoint is chosen by: `accuracy`, or a split's (`validation_matched_accuracy`);
    # None: the task's main metric on its first dev split
    metric_for_best_model: Optional[str] = None
    # distill: also keep each checkpoint saved as checkpoint-<step>/, at most this many (the oldest removed)
    save_total_limit: Optional[int] = positive_int(None, optional=True)

    def check(self, flag: str = "--", flags: Optional[dict[str, str]] = None) -> None:
        """`flag` prefixes the option names in messages (dump's fine-tuning options are --finetune-...)."""
        check_numbers(self, flag, flags)
        if self.lr_scheduler_type not in SCHEDULERS:
            raise PkdCacheError(f"{flag}lr-scheduler-type must be one of {', '.join(SCHEDULERS)}, got "
                                f"{self.lr_scheduler_type!r}")
        if self.eval_strategy not in EVAL_STRATEGIES:
            raise PkdCacheError(f"{flag}eval-strategy must be one of {', '.join(EVAL_STRATEGIES)}, got "
                                f"{self.eval_strategy!r}")
        if self.eval_steps is not None and self.eval_strategy != "steps":
            raise PkdCacheError(f"{flag}eval-steps needs {flag}eval-strategy steps")


SCHEDULERS = ("linear", "cosine", "constant_with_warmup")  # the Trainer's names
EVAL_STRATEGIES = ("epoch", "steps", "no")
# the TrainConfig fields that cache keys and fine-tuned teachers were identified by before later fields came: a later
# field counts only when it is not at its default, so every key made before it still finds its store
_KEYED_TRAIN_FIELDS = ("epochs", "learning_rate", "batch_size", "weight_decay", "warmup_ratio", "max_grad_norm",
                       "seed", "logging_steps", "max_steps", "save_steps")


def train_identity(train: dict) -> dict:
    """What identifies a TrainConfig (as a dict) in a cache key: its fields, less later ones left at their default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {k: v for k, v in train.items() if k in _KEYED_TRAIN_FIELDS or v != defaults.get(k)}


DEFAULT_BATCH_SIZE = 32  # the PKD paper's


def with_batch(train: TrainConfig) -> TrainConfig:
    """`train` with its batch size filled in (one process: the default unless given)."""
    return train if train.batch_size is not None else dataclasses.replace(train, batch_size=DEFAULT_BATCH_SIZE)


def resolve_batch(batch: Optional[int], per_device: Optional[int], accumulation: Optional[int],
                  world: int) -> tuple[int, Optional[int], int]:
    """(global batch, rows per forward on each rank or None for its whole share, accumulation steps), as the
    Hugging Face Trainer counts: the global batch is per-device x ranks x accumulation steps.

    `--batch-size` alone is the global batch (pkd-cache's own meaning): each rank takes its share (shares may
    differ by a row) and cuts it into `accumulation` forwards. Given with a per-device size, it must agree."""
    steps = accumulation or 1
    if per_device is None:
        batch = batch or DEFAULT_BATCH_SIZE
        return batch, None if steps == 1 else math.ceil(math.ceil(batch / world) / steps), steps
    if batch is None:
        batch = per_device * world * steps
    elif batch != per_device * world * steps:
        hint = f" (or add --gradient-accumulation-steps {batch // (per_device * world)})" \
            if accumulation is None and batch % (per_device * world) == 0 else ""
        raise PkdCacheError(f"--batch-size {batch} (the global batch) disagrees with --per-device-train-batch-size "
                            f"{per_device} x {world} rank(s) x --gradient-accumulation-steps {steps} = "
                            f"{per_device * world * steps}; give only one of the two{hint}")
    return batch, None if world == 1 and steps == 1 else per_device, steps


@dataclass
class FinetuneConfig:
    """`pkd-cache finetune`: the paper's teacher recipe (AdamW, linear decay, keep the best dev checkpoint)."""

    model: str
    task: str
    output_dir: str
    data_dir: Optional[str] = None
    max_seq_length: int = positive_int(128)
    overwrite: bool = False
    # as in run_glue.py: only the first N (smoke runs, tests)
    max_train_samples: Optional[int] = positive_int(None, optional=True)
    max_eval_samples: Optional[int] = positive_int(None, optional=True)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.train = with_batch(self.train)

    def check(self) -> None:
        self.train.check()
        check_numbers(self)


@dataclass
class DumpConfig:
    """`pkd-cache dump`: run the teacher once, write every layer's [CLS] vector to a store."""

    teacher: str
    task: str
    out: Optional[str] = None  # where the store goes; None: its place in the cache (`cache`)
    data_dir: Optional[str] = None
    splits: Optional[list[str]] = None  # default: train and every dev split of the task
    max_seq_length: int = positive_int(128)
    batch_size: int = positive_int(64)
    dtype: str = "float16"  # storage dtype of the CLS vectors; int8 adds a per-vector scale
    chunk_size: int = positive_int(1024)  # examples per chunk along N
    sort_window: int = positive_int(8192)  # examples sorted by length together (whole chunks); no batch crosses one
    overwrite: bool = False
    finetune: bool = True  # fine-tune a teacher whose head is untrained; False refuses instead
    finetune_train: TrainConfig = field(default_factory=TrainConfig)
    device: Optional[str] = None
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; fp16 only on GPU)
    pad_to_max_length: bool = False  # pad every batch to max_seq_length (the original PKD code) instead of bucketing
    max_examples: Optional[int] = positive_int(None, optional=True)  # only the first N of each split (smoke runs)
    format: str = "zarr"  # a store backend's name (store/backends/): zarr | arrow (IPC shards `datasets` reads)
    resume: bool = False  # continue an interrupted dump into `out`: its durable chunks are kept
    cache: Optional[str] = None  # a folder or bucket of stores found by content (store/cache.py); None: $PKD_CACHE
    wait: bool = True  # in the cache, wait for another dump writing the same store; False: refuse at once
    add_splits: Optional[list[str]] = None  # extend the complete store at `out` (or in the cache) with these splits
    # --task lm (a token store of a causal-LM teacher, docs/FORMAT.md version 2; docs/TOKEN_KD.md):
    data_files: Optional[list[str]] = None  # the training corpus: txt, jsonl, parquet or a hub dataset
    validation_files: Optional[list[str]] = None  # a held-out corpus, stored as split "validation"
    text_column: str = "text"  # the jsonl field or parquet column holding each document
    logits: str = "sample:64"  # sample:N | topk:K | none (logit_spec.py)
    hidden_layers: Optional[list[int]] = None  # teacher layers whose per-token hidden states are stored (0 = embeddings)
    sequence_mode: str = "pack"  # pack | cut | none: documents packed into, cut to, or refused beyond max_seq_length
    sample_seed: int = num(0, lo=0, lo_closed=True, integer=True, cap=INT_MAX)  # sample:N's draws (in the cache key)
    temperature: float = num(1.0, lo=0)  # the teacher's softmax temperature of the stored targets
    chunk_tokens: int = positive_int(4096)  # tokens per chunk (row) of a token store

    def __post_init__(self) -> None:
        self.finetune_train = with_batch(self.finetune_train)  # part of the cache key: never None there

    @property
    def is_lm(self) -> bool:
        return self.task == LM_TASK

    def check(self) -> None:
        check_numbers(self)
        if self.add_splits and (self.resume or self.overwrite):
            raise PkdCacheError("--add-split extends a complete store; it cannot be combined with --resume or "
                                "--overwrite")
        if self.dtype not in CLS_DTYPES:
            raise PkdCacheError(f"--dtype must be float16, float32 or int8, got {self.dtype!r}")
        self._check_lm()
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise PkdCacheError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        # checked with or without --finetune: a nonsense value is refused, not silently ignored
        self.finetune_train.check(flag="--finetune-", flags={"seed": "--seed"})
        check_device(self.device)


    def _check_lm(self) -> None:
        lm_only = {"--data-files": self.data_files, "--validation-file": self.validation_files,
                   "--hidden-layers": self.hidden_layers}
        if not self.is_lm:
            given = [flag for flag, value in lm_only.items() if value]
            if given:
                raise PkdCacheError(f"{given[0]} is for --task lm; {self.task} reads its data from --data-dir")
            return
        from .logit_spec import LogitSpec

        if not self.data_files:
            raise PkdCacheError("dump --task lm needs a corpus: pass --data-files FILE (txt, jsonl, parquet, or a hub "
                                "dataset)")
        LogitSpec.parse(self.logits)
        if self.sequence_mode not in SEQUENCE_MODES:
            raise PkdCacheError(f"--sequence-mode must be one of {', '.join(SEQUENCE_MODES)}, got "
                                f"{self.sequence_mode!r}")
        if self.add_splits:
            raise PkdCacheError("--add-split is for sentence-level stores; dump the corpus again for --task lm")


@dataclass
class DistillConfig:
    """`pkd-cache distill`: train a k-layer student from a store, with no teacher in memory.

    Loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher/T || student/T) + beta * patient,
    patient = mean over mapped layers of ||h_s/|h_s| - h_t/|h_t|||^2, the squared distance *summed* over the
    hidden dimension (the paper's equation). `beta=None` means the paper's beta=100 in the original code's
    units (mean over the hidden dimension), i.e. 100 / hidden_size here.
    """

    store: Optional[str] = None  # the store to distil from (or `teacher`, for online KD)
    output_dir: str = ""
    student_layers: int = positive_int(3)
    strategy: str = "skip"  # skip | last
    layer_map: Optional[list[int]] = None
    alpha: float = num(0.5, lo=0, lo_closed=True, hi=1)
    beta: Optional[float] = num(None, lo=0, lo_closed=True, optional=True)
    temperature: Optional[float] = num(None, lo=0, optional=True)  # None: 10 (PKD); a token store's own (lm)
    student_init: Optional[str] = None  # default: the teacher's base model recorded in the store
    task: Optional[str] = None  # a check: when given, it must be the store's task
    train_split: str = "train"
    eval_splits: Optional[list[str]] = None  # default: every split of the store except train_split
    overwrite: bool = False
    device: Optional[str] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False  # continue from the checkpoint in output_dir (written every save_steps / epoch)
    # rows per forward on each device (run_glue's --per_device_train_batch_size): the global batch is this x ranks x
    # gradient_accumulation_steps (resolve_batch; train.batch_size, if given too, must agree)
    per_device_train_batch_size: Optional[int] = positive_int(None, optional=True)
    gradient_accumulation_steps: Optional[int] = positive_int(None, optional=True)  # None: 1, or implied
    per_device_eval_batch_size: int = positive_int(128)  # dev scoring (rank 0 alone scores)
    report_to: Optional[list[str]] = None  # tensorboard | wandb | mlflow | all | none (reporting.py)
    do_predict: bool = False  # after training: the best student's test-split predictions, as run_glue writes them
    fp16: bool = False  # the student's forward under float16 autocast, its loss scaled (GradScaler): CUDA only
    bf16: bool = False  # the student's forward under bfloat16 autocast (CUDA, or CPU)
    # threads that read and decode store chunks ahead (pkd-cache loads with threads, not worker processes); 0: in the
    # training thread, nothing ahead; None: up to 4
    dataloader_num_workers: Optional[int] = num(None, lo=0, lo_closed=True, cap=64, integer=True, optional=True)
    # online KD, for comparison: no store, the teacher runs on every step over the task's data
    teacher: Optional[str] = None
    data_dir: Optional[str] = None
    max_seq_length: int = positive_int(128)
    chunk_size: int = positive_int(1024)  # batches in the order of a store with this chunk size
    max_examples: Optional[int] = positive_int(None, optional=True)
    allow_no_checksums: bool = False  # read a store without a checksum manifest (pkd-cache 0.1.0)
    # token stores (--task lm): real tokens per batch (default: batch_size x the store's max_seq_length, as run_clm's
    # batches of block_size sequences); the loss is CE + alpha x KD, + beta x hidden-state MSE on --layer-map
    max_tokens: Optional[int] = positive_int(None, optional=True)

    @property
    def kd_temperature(self) -> float:
        """The KD temperature of a sentence-level distill: --temperature, 10 by default (the PKD paper's sweeps)."""
        return 10.0 if self.temperature is None else self.temperature

    def check(self) -> None:
        self.train.check()
        check_numbers(self)
        if (self.store is None) == (self.teacher is None):
            raise PkdCacheError("pass --store (distil from a store) or --teacher (online KD), not both or neither")
        if not self.output_dir:
            raise PkdCacheError("--output-dir is required")
        if self.strategy not in ("skip", "last"):
            raise PkdCacheError(f"--strategy must be 'skip' or 'last', got {self.strategy!r}")
        if self.fp16 and self.bf16:
            raise PkdCacheError("--fp16 and --bf16 exclude each other; pass one")
        bad = [n for n in self.report_to or [] if n not in ("tensorboard", "wandb", "mlflow", "all", "none")]
        if bad:
            raise PkdCacheError(f"--report-to {bad[0]!r}: one of tensorboard, wandb, mlflow, all or none")
        check_device(self.device)


@dataclass
class EvalConfig:
    """`pkd-cache eval`: a saved model on the task's dev split(s), from raw data."""

    model: str
    task: str
    data_dir: Optional[str] = None
    # default: the length the model was trained with (its tokenizer's)
    max_seq_length: Optional[int] = positive_int(None, optional=True)
    batch_size: int = positive_int(64)
    device: Optional[str] = None
    max_examples: Optional[int] = positive_int(None, optional=True)
    data_files: Optional[list[str]] = None  # --task lm: the held-out corpus (txt, jsonl, parquet or a hub dataset)
    text_column: str = "text"  # --task lm: the jsonl field or parquet column holding each document

    def check(self) -> None:
        check_numbers(self)
        check_device(self.device)
        if self.task == "lm" and not self.data_files:
            raise PkdCacheError("eval --task lm scores perplexity on a held-out corpus: pass --data-files FILE")
        if self.task != "lm" and self.data_files:
            raise PkdCacheError(f"--data-files is for --task lm; {self.task} reads its dev split from --data-dir")


LM_TASK = "lm"  # `--task lm`: a causal-LM teacher over a plain-text corpus, a token store (docs/FORMAT.md v2)
SEQUENCE_MODES = ("pack", "cut", "none")  # data/corpus.py MODES


def to_dict(config) -> dict:
    """A JSON-ready view of a config, for metrics.json and store metadata."""
    return asdict(config)
