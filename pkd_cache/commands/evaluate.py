"""Scoring a model on a task's dev split(s): from raw data (`pkd-cache eval`, fine-tuning) or any batches."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..config import EvalConfig
from ..errors import PkdCacheError
from ..data.batches import ArrayBatches
from ..data.loading import load_examples
from ..data.metrics import compute_metrics, metric_names
from ..data.tasks import TaskSpec, get_task
from ..data.tokenize import to_model_inputs, tokenize
from ..progress import log, progress_bar
from ..training import predict, resolve_device
from .paths import save_eval_results


def main_metric_key(task: TaskSpec, splits: Optional[Iterable[str]] = None, asked: Optional[str] = None) -> str:
    """The dev metric the best checkpoint is kept by: `asked` (--metric-for-best-model: `accuracy`, the Trainer's
    `eval_accuracy`, or a split's `validation_matched_accuracy`), else the task's main metric; on the first dev
    split unless the key names one."""
    splits = list(splits) if splits is not None else list(task.dev_splits)
    if asked is None:
        return f"{splits[0]}_{task.main_metric}"
    name = asked.removeprefix("eval_")
    names = metric_names(task)
    if name in names:
        return f"{splits[0]}_{name}"
    keys = [f"{s}_{n}" for s in splits for n in names]
    if name in keys:
        return name
    raise PkdCacheError(f"--metric-for-best-model {asked!r}: {task.name} is scored by {', '.join(names)} (or one "
                        f"split's: {', '.join(keys)})")


def score(model, batches_by_split: dict[str, Iterable[dict]], task: TaskSpec, device,
          counts: Optional[dict[str, int]] = None) -> dict[str, float]:
    """Flat metrics `{split}_{metric}` for every split, e.g. `validation_accuracy`. With `counts` (batches per
    split), a progress bar per split."""
    out: dict[str, float] = {}
    for split, batches in batches_by_split.items():
        if counts is not None:
            batches = counted(batches, counts[split], f"scoring {split}")
        logits, labels = predict(model, batches, device, to_model_inputs)
        for k, v in compute_metrics(task, logits.numpy(), labels.numpy()).items():
            out[f"{split}_{k}"] = v
    return out


def split_and_metric(key: str, task: TaskSpec) -> tuple[str, str]:
    """`validation_matched_accuracy` -> ("validation_matched", "accuracy")."""
    for split in sorted(task.dev_splits, key=len, reverse=True):
        if key.startswith(split + "_"):
            return split, key[len(split) + 1:]
    split, _, metric = key.rpartition("_")
    return split, metric


def counted(batches: Iterable[dict], total: int, label: str):
    """`batches`, with a progress bar of `total` (predicting, scoring)."""
    with progress_bar(total, label, unit="batch") as bar:
        for batch in batches:
            yield batch
            bar.advance(1)


def raw_dev_batches(tokenizer, task: TaskSpec, data_dir: Optional[str], max_seq_length: int, batch_size: int,
                    max_examples: Optional[int] = None) -> dict[str, ArrayBatches]:
    out = {}
    for split in task.dev_splits:
        ex = load_examples(task, split, data_dir, max_examples)
        arrays = tokenize(tokenizer, ex, 0, len(ex), max_seq_length)
        arrays["labels"] = ex.labels
        out[split] = ArrayBatches(arrays, batch_size)
    return out


def trained_max_length(loaded) -> int:
    """The length a pkd-cache model was trained at (saved as its tokenizer's model_max_length), else 128."""
    limit = getattr(loaded.model.config, "max_position_embeddings", 512) or 512
    saved = getattr(loaded.tokenizer, "model_max_length", None)
    return int(saved) if saved and saved <= limit else min(128, limit)


def evaluate(config: EvalConfig) -> dict[str, float]:
    """`pkd-cache eval`: load a saved model and score it on the task's dev split(s), or (`--task lm`) a causal LM's
    perplexity on `--data-files` (commands/evaluate_lm.py)."""
    from ..models import check_max_length, load_for_task

    config.check()
    if config.task == "lm":
        from .evaluate_lm import evaluate_lm  # torch, transformers: only for this task

        return evaluate_lm(config)
    task = get_task(config.task)
    loaded = load_for_task(config.model, task, what="model")
    max_len = config.max_seq_length or trained_max_length(loaded)
    check_max_length(loaded, max_len)
    device = resolve_device(config.device)
    model = loaded.model.to(device)
    batches = raw_dev_batches(loaded.tokenizer, task, config.data_dir, max_len, config.batch_size,
                              config.max_examples)
    metrics = score(model, {s: b.epoch() for s, b in batches.items()}, task, device,
                    counts={s: len(b) for s, b in batches.items()})
    saved = save_eval_results(Path(config.model).expanduser(), {"task": task.name, **metrics})
    log(f"wrote {saved}" if saved else f"scores not written: {config.model} is not a folder pkd-cache wrote "
        f"(its scores are printed only)")
    return metrics
