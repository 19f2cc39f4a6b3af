"""Stage 2: train a k-layer student from a store alone. The teacher is never constructed or loaded.

Under `torchrun`, DistributedDataParallel: every rank reads only its part of each batch from the store
(`stream.iter_batches(shard=...)`), accumulates it in steps of `--per-device-batch-size` rows, and the all-reduced
gradient is the mean over the whole batch, so the global batch is the `--batch-size` asked for. Rank 0 evaluates,
logs and saves.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint
from ..config import DistillConfig, to_dict
from ..data.tasks import get_task
from ..data.tokenize import to_model_inputs
from ..store.format import TOKEN_DTYPES
from ..store.stream import trim_padding
from ..distributed import Ranks, barrier, gather, process_group, rank_device, ranks_from_env
from ..errors import PkdCacheError
from .evaluate import main_metric_key, score
from .output_lock import OutputLock
from .paths import check_inputs, check_output_dir, model_inputs, prepare_output, resume_dir, resume_output
from ..progress import log
from ..store.reader import open_store
from ..store.stream import batch_sizes
from ..student.init import build_student, student_cls
from ..student.layer_map import layer_map
from ..student.losses import LossWeights, pkd_loss
from ..training import Member, resolve_device, total_steps_of, train_many, write_metrics

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


# What fixes the batches: members of one pass (`distill_many`) must agree on these.
PASS_KEYS = ("store", "teacher", "data_dir", "max_seq_length", "chunk_size", "max_examples", "train_split",
             "batch_size", "seed", "epochs", "max_steps", "device", "per_device_batch_size")


@dataclass
class _Plan:
    """One student's settings, resolved and checked against the store before anything is built or written."""

    config: DistillConfig
    task: object
    k: int
    lmap: list[int]
    beta: float
    init: str
    eval_splits: list[str]
    inputs: list  # what the output folder must never be nor contain (paths.check_inputs)

    @property
    def need_cls(self) -> bool:
        return self.beta > 0 and self.k > 1


def _plan(config: DistillConfig, store) -> _Plan:
    config.check()
    meta = store.info()
    task = _store_task(meta, config)
    k = config.student_layers
    lmap = layer_map(store.teacher_layers, k, config.strategy, config.layer_map)
    store.num_examples(config.train_split)  # names the store's splits if this one is missing
    eval_splits = config.eval_splits or [s for s in store.splits if s != config.train_split]
    if not eval_splits:
        raise PkdCacheError(f"store {config.store} has no dev split to evaluate on (splits: {', '.join(store.splits)})")
    init = config.student_init or meta["teacher"].get("base_model")
    if not init:
        raise PkdCacheError("the store does not record the teacher's base model; pass --student-init")
    beta = config.beta if config.beta is not None else 100.0 / store.hidden_size
    inputs = model_inputs(config.store, meta, ("the teacher", config.teacher), ("--student-init", init),
                          ("--data-dir", config.data_dir))
    if not config.resume:
        check_output_dir(config.output_dir, config.overwrite, "student", inputs=inputs)
    else:
        check_inputs(Path(config.output_dir), inputs, "--output-dir", config.output_dir)
        if checkpoint.load(resume_dir(config.output_dir)) is None:
            raise PkdCacheError(f"--resume: no checkpoint in {config.output_dir} to continue from")
    return _Plan(config, task, k, lmap, beta, init, eval_splits, inputs)


def _pass_settings(config: DistillConfig) -> dict:
    flat = {**to_dict(config), **to_dict(config.train)}
    return {k: flat.get(k) for k in PASS_KEYS}


def distill(config: DistillConfig) -> dict:
    """Train the student, keep the best dev checkpoint in `config.output_dir`; returns the metrics."""
    return distill_many([config])[0]


def distill_many(configs: list[DistillConfig], description: str = "distill") -> list[dict]:
    """Train several students in one pass over the store: each batch is read and decompressed once, then every
    student takes its step on it. Each student trains exactly as it would alone (own seed, RNG, optimiser,
    checkpoint, metrics.json); they must share the store, batch size, seed, epochs and max steps."""
    if not configs:
        return []
    first = _pass_settings(configs[0])
    for c in configs[1:]:
        diff = [k for k, v in _pass_settings(c).items() if v != first[k]]
        if diff:
            raise PkdCacheError(f"students trained in one pass must share {', '.join(PASS_KEYS)}; "
                                f"{c.output_dir} differs in {', '.join(diff)}")
    outs = [c.output_dir for c in configs]
    if len(set(outs)) != len(outs):
        raise PkdCacheError("students trained in one pass need distinct output directories")
    for c in configs:
        c.check()
    resume = {c.resume for c in configs}
    if len(resume) != 1:
        raise PkdCacheError("the students of one pass must all resume or all start")
    ranks = ranks_from_env()
    device = rank_device(ranks, resolve_device(configs[0].device))
    with process_group(ranks, device), _quiet(not ranks.main), contextlib.ExitStack() as locks:
        store = _source(configs[0], device)
        plans = [_plan(c, store) for c in configs]  # every check before any model is built or folder written
        if ranks.main:  # one run writes an output folder at a time: held until the students are in place
            for p in plans:
                locks.enter_context(OutputLock(Path(p.config.output_dir), p.config.output_dir))
        barrier(ranks)  # every rank has checked the output folders before rank 0 prepares them
        layers = sorted({layer for p in plans if p.need_cls for layer in p.lmap})
        members, finishers = zip(*(_member(p, store, device, layers, len(plans) > 1, ranks) for p in plans))
        train_cfg = configs[0].train
        fields = ("input_ids", "attention_mask", "token_type_ids", "labels", "logits") + (("cls",) if layers else ())
        n, size = store.num_examples(configs[0].train_split), train_cfg.batch_size
        sizes = batch_sizes(n, size, ranks.world)  # rows of each batch

        def epoch_batches(epoch: int, start_batch: int = 0):
            batches = store.batches(configs[0].train_split, size, shuffle=True, seed=train_cfg.seed, epoch=epoch,
                                    layers=layers or None, fields=fields, pin_memory=device.type == "cuda",
                                    start_batch=start_batch, shard=(ranks.rank, ranks.world))
            if not (ranks.many or configs[0].per_device_batch_size):
                return batches
            return ({**b, GLOBAL_ROWS: sizes[start_batch + i]} for i, b in enumerate(batches))

        t0 = time.perf_counter()
        try:
            results = train_many(list(members), len(sizes), epoch_batches, description=description,
                                 save_steps=train_cfg.save_steps, resume=resume.pop())
            metrics = [finish(result, time.perf_counter() - t0) for finish, result in zip(finishers, results)]
        except BaseException:
            for finish in finishers:  # a failed run: the old output stays, a resumable checkpoint too
                if finish.output is not None:
                    finish.output.abandon()
            raise
        barrier(ranks)  # every rank returns once rank 0 has written the students
    return metrics


GLOBAL_ROWS = "_global_rows"  # under torchrun: the rows of the whole batch this rank's part belongs to


@contextlib.contextmanager
def _quiet(quiet: bool):
    """Log lines and progress bars from rank 0 only."""
    from ..progress import console

    before, console.quiet = console.quiet, quiet or console.quiet
    try:
        yield
    finally:
        console.quiet = before


class _Trainable(torch.nn.Module):
    """The student and its (optional) CLS projection as one module, so that DDP all-reduces both."""

    def __init__(self, model: torch.nn.Module, projection: Optional[torch.nn.Module], k: int, need_cls: bool):
        super().__init__()
        self.model, self.projection, self.k, self.need_cls = model, projection, k, need_cls

    def forward(self, **inputs):
        outputs = self.model(**inputs, output_hidden_states=self.need_cls)
        s_cls = student_cls(outputs.hidden_states, self.k) if self.need_cls else None
        if s_cls is not None and self.projection is not None:
            s_cls = self.projection(s_cls)
        return outputs.logits, s_cls


def _source(config: DistillConfig, device):
    """Where the batches and the teacher's outputs come from: the store, or (online KD) the teacher itself."""
    if config.teacher is None:
        return open_store(config.store, allow_no_checksums=config.allow_no_checksums)
    from ..online import OnlineSource

    return OnlineSource(config.teacher, config.task, config.data_dir, config.max_seq_length, config.chunk_size,
                        device, config.max_examples)


def _member(plan: _Plan, store, device, layers: list[int], named: bool, ranks=Ranks()):
    """The student of `plan` as a training `Member`, and a function that writes its metrics when training ends."""
    config, task, k = plan.config, plan.task, plan.k
    meta = store.info()
    torch.manual_seed(config.train.seed)
    student = build_student(plan.init, task, k, meta["tokenizer"].get("vocab_fingerprint"))
    model = student.model
    hidden, teacher_hidden = model.config.hidden_size, store.hidden_size
    projection = None
    if plan.need_cls and hidden != teacher_hidden:  # a narrower (or wider) student: learn a map to the teacher's width
        projection = torch.nn.Linear(hidden, teacher_hidden, bias=False)
    # everything has loaded: start the output (aside, when it replaces one), or continue the interrupted one
    output = None if not ranks.main else resume_output(config.output_dir, "student", "distill") if config.resume \
        else prepare_output(config.output_dir, config.overwrite, "student", "distill", inputs=plan.inputs)
    out = output.work if output is not None else resume_dir(config.output_dir)  # other ranks only read checkpoints
    model.to(device)
    if projection is not None:
        projection.to(device)
    weights = LossWeights(alpha=config.alpha, beta=plan.beta, temperature=config.temperature)
    positions = [layers.index(layer) for layer in plan.lmap] if plan.need_cls else []
    log(f"distilling a {k}-layer student from {plan.init} on {task.name} into {config.output_dir}: layer map "
        f"{plan.lmap} of {store.teacher_layers} teacher layers, alpha {config.alpha:g}, beta {plan.beta:g}, "
        f"T {config.temperature:g}"
        + (f", CLS projected {hidden} -> {teacher_hidden}" if projection is not None else ""))

    trainable = _Trainable(model, projection, k, plan.need_cls)
    forward, no_sync, micro_batches = trainable, None, None
    if ranks.many or config.per_device_batch_size:
        micro_batches = _micro_batches(config.per_device_batch_size, ranks.world)
    if ranks.many:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(trainable, device_ids=[device] if device.type == "cuda" else None)
        no_sync = forward.no_sync
        torch.manual_seed(config.train.seed + ranks.rank)  # dropout differs across ranks; rank 0's is a 1-rank run's

    def loss_fn(batch):
        logits, s_cls = forward(**to_model_inputs(batch, device))
        on_device = {key: batch[key].to(device, non_blocking=True) for key in ("labels", "logits")}
        if plan.need_cls:
            cls = batch["cls"] if positions == list(range(len(layers))) else batch["cls"][:, positions]
            on_device["cls"] = cls.to(device, non_blocking=True)
        return pkd_loss(logits, s_cls, on_device, weights, task.is_regression)

    def evaluate():
        return score(model, {s: store.batches(s, 128, shuffle=False, fields=EVAL_FIELDS) for s in plan.eval_splits},
                     task, device)

    student.tokenizer.model_max_length = int(meta["max_seq_length"])  # `eval` scores at the trained length

    def save_best():  # the projection is a training aid: not part of the saved student
        model.save_pretrained(out)
        student.tokenizer.save_pretrained(out)
        output.record()  # these files are pkd-cache's: a later --overwrite may replace them

    n, size = store.num_examples(config.train_split), config.train.batch_size
    steps_per_epoch = len(batch_sizes(n, size, ranks.world))
    main_key = main_metric_key(task, plan.eval_splits)
    extra = list(projection.named_parameters(prefix="cls_projection")) if projection is not None else None
    member = Member(model, config.train, total_steps_of(config.train, steps_per_epoch), loss_fn, evaluate, main_key,
                    save_best, extra, name=Path(config.output_dir).name if named else "", output_dir=out,
                    micro_batches=micro_batches, no_sync=no_sync, rank=ranks.rank,
                    gather=functools.partial(gather, ranks) if ranks.many else None)

    def finish(result, seconds: float) -> dict:
        metrics = {"task": task.name, "store": config.store, "online_teacher": config.teacher,
                   "student_init": plan.init, "student_layers": k,
                   "layer_map": plan.lmap, "alpha": config.alpha, "beta": plan.beta,
                   "temperature": config.temperature,
                   "cls_projection": [hidden, teacher_hidden] if projection else None,
                   "best_epoch": result.best_epoch, "best_" + main_key: result.best_metric, "history": result.history,
                   "steps": result.steps, "wall_seconds": seconds,
                   "teacher_weights_fingerprint": meta["teacher"].get("weights_fingerprint"), "config": to_dict(config),
                   "ranks": ranks.world}
        if not ranks.main:
            return metrics
        write_metrics(out, metrics)
        checkpoint.remove(out)  # finished: the resume aid goes
        final = output.commit()  # in place only now: the student it replaces was kept until here
        log(f"best {main_key} {result.best_metric:.4f} (epoch {result.best_epoch}); student saved to {final}")
        return metrics

    finish.output = output
    return member, finish


def _micro_batches(per_device: Optional[int], world: int):
    """This rank's part of a batch as (micro-batch, loss weight): weights W * rows / global rows, so that DDP's
    all-reduced mean over ranks is the gradient of the mean loss over the whole batch."""

    def split(batch: dict) -> list[tuple[dict, float]]:
        total = batch[GLOBAL_ROWS]
        tensors = {k: v for k, v in batch.items() if k != GLOBAL_ROWS}
        rows = len(tensors["labels"])
        step = per_device or rows
        return [(trim_padding({k: v[a:a + step] for k, v in tensors.items()}), world * min(step, rows - a) / total)
                for a in range(0, rows, step)]

    return split
