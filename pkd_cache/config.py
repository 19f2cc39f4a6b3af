"""Typed configs shared by the CLI and the Python API.

Each CLI command builds exactly one of these and hands it to the matching function
(`finetune`, `dump`, `distill`, `evaluate`), so the two front ends cannot drift apart.
Defaults follow the PKD paper (Sun et al., 2019) and Hugging Face `run_glue.py`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import PkdCacheError


@dataclass
class TrainConfig:
    """Optimiser and schedule settings shared by fine-tuning and distillation."""

    epochs: float = 4.0
    learning_rate: float = 2e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    logging_steps: int = 50
    max_steps: int = -1  # > 0 stops after this many optimiser steps (smoke runs, benchmarks)
    save_steps: int = 0  # distill: > 0 also checkpoints every N steps (it always does after each epoch)

    def check(self, flag: str = "--") -> None:
        """`flag` prefixes the option names in messages (dump's fine-tuning options are --finetune-...)."""
        check_positive(self.epochs, f"{flag}epochs")
        check_positive(self.learning_rate, f"{flag}learning-rate")
        check_positive(self.batch_size, f"{flag}batch-size")
        if not 0 <= self.warmup_ratio < 1:
            raise PkdCacheError(f"{flag}warmup-ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class FinetuneConfig:
    """`pkd-cache finetune`: the paper's teacher recipe (AdamW, linear decay, keep the best dev checkpoint)."""

    model: str
    task: str
    output_dir: str
    data_dir: Optional[str] = None
    max_seq_length: int = 128
    overwrite: bool = False
    max_train_samples: Optional[int] = None  # as in run_glue.py: only the first N (smoke runs, tests)
    max_eval_samples: Optional[int] = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        self.train.check()
        check_positive(self.max_seq_length, "--max-seq-length")
        check_positive_or_none(self.max_train_samples, "--max-train-samples")
        check_positive_or_none(self.max_eval_samples, "--max-eval-samples")


@dataclass
class DumpConfig:
    """`pkd-cache dump`: run the teacher once, write every layer's [CLS] vector to a store."""

    teacher: str
    task: str
    out: str
    data_dir: Optional[str] = None
    splits: Optional[list[str]] = None  # default: train and every dev split of the task
    max_seq_length: int = 128
    batch_size: int = 64
    dtype: str = "float16"  # storage dtype of the CLS vectors; int8 adds a per-vector scale
    chunk_size: int = 1024  # examples per chunk along N
    sort_window: int = 8192  # examples sorted by length together (whole chunks); no batch crosses a window
    overwrite: bool = False
    finetune: bool = True  # fine-tune a teacher whose head is untrained; False refuses instead
    finetune_train: TrainConfig = field(default_factory=TrainConfig)
    device: Optional[str] = None
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; fp16 only on GPU)
    pad_to_max_length: bool = False  # pad every batch to max_seq_length (the original PKD code) instead of bucketing
    max_examples: Optional[int] = None  # take only the first N examples of each split (smoke runs)
    format: str = "zarr"  # zarr | arrow (Arrow IPC shards, readable with `datasets`)
    resume: bool = False  # continue an interrupted dump into `out`: its durable chunks are kept

    def check(self) -> None:
        check_positive(self.max_seq_length, "--max-seq-length")
        check_positive(self.batch_size, "--batch-size")
        check_positive(self.chunk_size, "--chunk-size")
        check_positive(self.sort_window, "--sort-window")
        if self.dtype not in ("float16", "float32", "int8"):
            raise PkdCacheError(f"--dtype must be float16, float32 or int8, got {self.dtype!r}")
        check_positive_or_none(self.max_examples, "--max-examples")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise PkdCacheError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.format not in ("zarr", "arrow"):
            raise PkdCacheError(f"--format must be zarr or arrow, got {self.format!r}")
        if self.finetune:
            self.finetune_train.check(flag="--finetune-")


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
    student_layers: int = 3
    strategy: str = "skip"  # skip | last
    layer_map: Optional[list[int]] = None
    alpha: float = 0.5
    beta: Optional[float] = None
    temperature: float = 10.0
    student_init: Optional[str] = None  # default: the teacher's base model recorded in the store
    task: Optional[str] = None  # a check: when given, it must be the store's task
    train_split: str = "train"
    eval_splits: Optional[list[str]] = None  # default: every split of the store except train_split
    overwrite: bool = False
    device: Optional[str] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False  # continue from the checkpoint in output_dir (written every save_steps / epoch)
    # under torchrun: rows per forward on each rank; each rank's share of a batch is accumulated in steps of it
    per_device_batch_size: Optional[int] = None
    # online KD, for comparison: no store, the teacher runs on every step over the task's data
    teacher: Optional[str] = None
    data_dir: Optional[str] = None
    max_seq_length: int = 128
    chunk_size: int = 1024  # batches in the order of a store with this chunk size
    max_examples: Optional[int] = None

    def check(self) -> None:
        self.train.check()
        if (self.store is None) == (self.teacher is None):
            raise PkdCacheError("pass --store (distil from a store) or --teacher (online KD), not both or neither")
        if not self.output_dir:
            raise PkdCacheError("--output-dir is required")
        if self.teacher is not None:
            check_positive(self.max_seq_length, "--max-seq-length")
            check_positive_or_none(self.max_examples, "--max-examples")
            check_positive(self.chunk_size, "--chunk-size")
        check_positive(self.student_layers, "--student-layers")
        check_positive_or_none(self.per_device_batch_size, "--per-device-batch-size")
        if self.strategy not in ("skip", "last"):
            raise PkdCacheError(f"--strategy must be 'skip' or 'last', got {self.strategy!r}")
        if not 0 <= self.alpha <= 1:
            raise PkdCacheError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.beta is not None and self.beta < 0:
            raise PkdCacheError(f"--beta must be >= 0, got {self.beta}")
        check_positive(self.temperature, "--temperature")


@dataclass
class EvalConfig:
    """`pkd-cache eval`: a saved model on the task's dev split(s), from raw data."""

    model: str
    task: str
    data_dir: Optional[str] = None
    max_seq_length: Optional[int] = None  # default: the length the model was trained with (its tokenizer's)
    batch_size: int = 64
    device: Optional[str] = None
    max_examples: Optional[int] = None

    def check(self) -> None:
        if self.max_seq_length is not None:
            check_positive(self.max_seq_length, "--max-seq-length")
        check_positive(self.batch_size, "--batch-size")
        check_positive_or_none(self.max_examples, "--max-examples")


def check_positive(n: float, flag: str) -> None:
    if n <= 0:
        raise PkdCacheError(f"{flag} must be > 0, got {n}")


def check_positive_or_none(n: Optional[int], flag: str) -> None:
    if n is not None:
        check_positive(n, flag)


def to_dict(config) -> dict:
    """A JSON-ready view of a config, for metrics.json and store metadata."""
    return asdict(config)
