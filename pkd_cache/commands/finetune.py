"""Fine-tuning a teacher on a task: the PKD paper's recipe (AdamW, linear decay, best dev checkpoint)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..version import __version__
from ..config import FinetuneConfig, to_dict
from ..data.batches import ArrayBatches
from ..data.loading import load_examples
from ..data.tasks import get_task
from ..data.tokenize import to_model_inputs, tokenize
from .evaluate import main_metric_key, raw_dev_batches, score
from .interrupt import stop_on_sigterm
from .output_lock import OutputLock
from .paths import check_output_dir, prepare_output
from ..progress import log
from ..student.losses import hard_loss
from ..training import resolve_device, train, write_metrics
from ..models import FINETUNE_INFO, LoadedModel, check_max_length, load_for_task


def finetune(config: FinetuneConfig, loaded: LoadedModel | None = None) -> dict:
    """Fine-tune `config.model` on `config.task`; the best dev checkpoint lands in `config.output_dir`.

    It is written aside and put in place once training is done, so a failed run leaves the old output as it was."""
    config.check()
    task = get_task(config.task)
    inputs = [("--model", config.model), ("--data-dir", config.data_dir)]
    check_output_dir(config.output_dir, config.overwrite, "teacher", inputs=inputs)  # before the model loads
    # one run writes it at a time; SIGTERM unwinds like Ctrl-C, so no half-trained output is left behind
    with OutputLock(Path(config.output_dir), config.output_dir), stop_on_sigterm():
        return _finetune(config, task, inputs, loaded)


def _finetune(config: FinetuneConfig, task, inputs: list, loaded: LoadedModel | None) -> dict:
    command = loaded is None  # `pkd-cache finetune` itself, not a dump fine-tuning its teacher
    loaded = loaded or load_for_task(config.model, task)
    check_max_length(loaded, config.max_seq_length)
    torch.manual_seed(config.train.seed)
    train_ex = load_examples(task, "train", config.data_dir, config.max_train_samples)
    arrays = tokenize(loaded.tokenizer, train_ex, 0, len(train_ex), config.max_seq_length)
    arrays["labels"] = train_ex.labels
    train_batches = ArrayBatches(arrays, config.train.batch_size)
    dev = raw_dev_batches(loaded.tokenizer, task, config.data_dir, config.max_seq_length, 64, config.max_eval_samples)
    # everything has loaded; no resume here, so even a new output is written aside
    output = prepare_output(config.output_dir, config.overwrite, "teacher", "finetune", inputs=inputs,
                            always_aside=True)
    try:
        metrics = _train(config, task, loaded, train_ex, train_batches, dev, output)
    except BaseException:
        output.abandon(keep_checkpoint=False)
        raise
    if command:  # (a dump fine-tuning its teacher goes on with the dump)
        log(f"next: pkd-cache dump --teacher {config.output_dir} --task {task.name} --out {task.name}.zarr")
    return metrics


def _train(config: FinetuneConfig, task, loaded: LoadedModel, train_ex, train_batches, dev, output) -> dict:
    out = output.work
    device = resolve_device(None)
    model = loaded.model.to(device)
    log(f"fine-tuning {loaded.name} on {task.name}: {len(train_ex):,} train examples, "
        f"{config.train.epochs:g} epoch(s), lr {config.train.learning_rate:g}, batch {config.train.batch_size}")

    def loss_fn(batch):
        logits = model(**to_model_inputs(batch, device)).logits
        loss = hard_loss(logits, batch["labels"].to(device), task.is_regression)
        return loss, {"loss": loss.detach()}

    info = {"base_model": loaded.base_model or loaded.name, "task": task.name, "pkd_cache_version": __version__,
            "config": to_dict(config)}

    loaded.tokenizer.model_max_length = config.max_seq_length  # `eval` scores at the trained length

    def save_best():
        model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        (out / FINETUNE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        output.record()

    t0 = time.perf_counter()
    key = main_metric_key(task, asked=config.train.metric_for_best_model)
    result = train(model, config.train, len(train_batches),
                   lambda epoch: train_batches.epoch(shuffle=True, seed=config.train.seed, epoch=epoch),
                   loss_fn, lambda: score(model, {s: b.epoch() for s, b in dev.items()}, task, device),
                   key, save_best, description="finetune")
    metrics = {"task": task.name, "model": loaded.name, "best_epoch": result.best_epoch,
               "best_step": result.best_step, "best_" + key: result.best_metric, "history": result.history,
               "steps": result.steps, "wall_seconds": time.perf_counter() - t0, "config": to_dict(config)}
    write_metrics(out, metrics)
    info["metrics"] = {k: v for k, v in metrics.items() if k.startswith("best")}
    (out / FINETUNE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    final = output.commit()  # in place only now: the output it replaces was kept until here
    log(f"best {key} {result.best_metric:.4f} (epoch {result.best_epoch}); saved to {final}")
    return metrics
