"""Stage 2: train a k-layer student from a store alone. The teacher is never constructed or loaded."""
from __future__ import annotations

import math
import time

import torch

from .config import DistillConfig, to_dict
from .data.tasks import get_task
from .data.tokenize import TOKEN_DTYPES, to_model_inputs
from .errors import PkdCacheError
from .evaluate import main_metric_key, score
from .paths import check_output_dir, prepare_output_dir
from .progress import log
from .store.reader import open_store
from .student.init import build_student, student_cls
from .student.layer_map import layer_map
from .student.losses import LossWeights, pkd_loss
from .training import resolve_device, train, write_metrics

EVAL_FIELDS = tuple(TOKEN_DTYPES) + ("labels",)


def _store_task(meta: dict, config: DistillConfig):
    """The store's task; it must be the one `--task` names (if given) and have the label set pkd-cache knows."""
    name = meta["task"]["name"]
    if config.task is not None and get_task(config.task).name != name:
        raise PkdCacheError(f"--task {config.task} does not match the store's task {name} ({config.store})")
    task = get_task(name)
    stored = list(meta["task"].get("label_names") or [])
    if stored != list(task.label_names):
        raise PkdCacheError(f"the store's {name} labels {stored} differ from the task's {list(task.label_names)}; "
                            f"its label ids would mean other classes")
    return task


def distill(config: DistillConfig) -> dict:
    """Train the student, keep the best dev checkpoint in `config.output_dir`; returns the metrics."""
    config.check()
    store = open_store(config.store)
    meta = store.info()
    task = _store_task(meta, config)
    k, n_teacher, hidden = config.student_layers, store.teacher_layers, store.hidden_size
    lmap = layer_map(n_teacher, k, config.strategy, config.layer_map)
    train_split = config.train_split
    store.num_examples(train_split)  # names the store's splits if this one is missing
    eval_splits = config.eval_splits or [s for s in store.splits if s != train_split]
    if not eval_splits:
        raise PkdCacheError(f"store {config.store} has no dev split to evaluate on (splits: {', '.join(store.splits)})")
    init = config.student_init or meta["teacher"].get("base_model")
    if not init:
        raise PkdCacheError("the store does not record the teacher's base model; pass --student-init")
    beta = config.beta if config.beta is not None else 100.0 / hidden
    check_output_dir(config.output_dir, config.overwrite)

    torch.manual_seed(config.train.seed)
    student = build_student(init, task, k, meta["tokenizer"].get("vocab_fingerprint"))
    model = student.model
    if beta > 0 and model.config.hidden_size != hidden:
        raise PkdCacheError(f"the student's hidden size {model.config.hidden_size} differs from the teacher's {hidden}; "
                            f"the patient loss needs equal widths (use --beta 0)")
    out = prepare_output_dir(config.output_dir, config.overwrite)  # everything has loaded
    device = resolve_device(config.device)
    model.to(device)
    weights = LossWeights(alpha=config.alpha, beta=beta, temperature=config.temperature)
    need_cls = beta > 0 and k > 1
    fields = ("input_ids", "attention_mask", "token_type_ids", "labels", "logits") + (("cls",) if need_cls else ())
    log(f"distilling a {k}-layer student from {init} on {task.name}: layer map {lmap} of {n_teacher} teacher layers, "
        f"alpha {config.alpha:g}, beta {beta:g}, T {config.temperature:g}")

    def loss_fn(batch):
        outputs = model(**to_model_inputs(batch, device), output_hidden_states=need_cls)
        on_device = {key: batch[key].to(device, non_blocking=True) for key in ("labels", "logits", "cls") if key in batch}
        s_cls = student_cls(outputs.hidden_states, k) if need_cls else None
        return pkd_loss(outputs.logits, s_cls, on_device, weights, task.is_regression)

    def epoch_batches(epoch: int):
        return store.batches(train_split, config.train.batch_size, shuffle=True, seed=config.train.seed, epoch=epoch,
                             layers=lmap if need_cls else None, fields=fields, pin_memory=device.type == "cuda")

    def evaluate():
        return score(model, {s: store.batches(s, 128, shuffle=False, fields=EVAL_FIELDS) for s in eval_splits},
                     task, device)

    student.tokenizer.model_max_length = int(meta["max_seq_length"])  # `eval` scores at the trained length

    def save_best():
        model.save_pretrained(out)
        student.tokenizer.save_pretrained(out)

    t0 = time.perf_counter()
    steps_per_epoch = math.ceil(store.num_examples(train_split) / config.train.batch_size)
    main_key = main_metric_key(task, eval_splits)
    result = train(model, config.train, steps_per_epoch, epoch_batches, loss_fn, evaluate, main_key, save_best,
                   description="distill")
    metrics = {"task": task.name, "store": config.store, "student_init": init, "student_layers": k,
               "layer_map": lmap, "alpha": config.alpha, "beta": beta, "temperature": config.temperature,
               "best_epoch": result.best_epoch, "best_" + main_key: result.best_metric, "history": result.history,
               "steps": result.steps, "wall_seconds": time.perf_counter() - t0,
               "teacher_weights_fingerprint": meta["teacher"].get("weights_fingerprint"), "config": to_dict(config)}
    write_metrics(out, metrics)
    log(f"best {main_key} {result.best_metric:.4f} (epoch {result.best_epoch}); student saved to {out}")
    return metrics
