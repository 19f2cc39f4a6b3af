"""Stage 2: train a k-layer student from a store alone. The teacher is never constructed or loaded here: the batches
come from a `BatchSource` (sources.py), a store or, for online KD (`--teacher`), online.py's teacher-labelled batches.

Under `torchrun`, DistributedDataParallel: every rank reads only its part of each batch from the store
(`stream.iter_batches(shard=...)`), in forwards of `--per-device-train-batch-size` rows accumulated over
`--gradient-accumulation-steps`, and the all-reduced gradient is the mean over the whole batch: the global batch is
per-device x ranks x steps, as the Trainer counts (config.resolve_batch). Rank 0 evaluates, logs and saves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint
from ..config import DistillConfig, resolve_batch, to_dict
from ..data.loading import find_split_file, test_splits
from ..data.tasks import get_task
from ..data.tokenize import to_model_inputs
from ..distributed import DistContext, dist_context, process_group
from ..errors import PkdCacheError
from ..progress import log, quiet
from ..sources import BatchSource, open_source
from ..store.cache import resolve_store
from ..store.format import TOKEN_DTYPES, StoreMeta
from ..store.stream import batch_sizes, trim_padding
from ..student.init import build_student, student_cls
from ..student.layer_map import layer_map
from ..student.losses import LossWeights, pkd_loss
from ..training import Accumulation, Member, TrainResult, resolve_device, total_steps_of, train_many, write_metrics
from .evaluate import main_metric_key, score
from .model_card import write_model_card
from .output_lock import OutputLock
from .paths import check_inputs, check_output_dir, model_inputs, prepare_output, resume_dir, resume_output

EVAL_FIELDS = tuple(TOKEN_DTYPES) + ("labels",)
# --fp16 runs on these devices. CUDA only for users: float16 matmuls are slow on most CPUs, where --bf16 is the way.
# The tests add "cpu" to run the same autocast and GradScaler path on a machine without a GPU.
FP16_DEVICES = ("cuda",)


def _store_task(meta: StoreMeta, config: DistillConfig):
    """The store's task; it must be the one `--task` names (if given) and have the label set pkd-cache knows."""
    name = meta.task.name
    if config.task is not None and get_task(config.task).name != name:
        raise PkdCacheError(f"--task {config.task} does not match the store's task {name} ({config.store})")
    task = get_task(name)
    stored = list(meta.task.label_names)
    if stored != list(task.label_names):
        raise PkdCacheError(f"the store's {name} labels {stored} differ from the task's {list(task.label_names)}; "
                            f"its label ids would mean other classes")
    return task


# What fixes the batches: members of one pass (`distill_many`) must agree on these.
PASS_KEYS = ("store", "teacher", "data_dir", "max_seq_length", "chunk_size", "max_examples", "train_split",
             "batch_size", "seed", "epochs", "max_steps", "device", "per_device_train_batch_size",
             "gradient_accumulation_steps")


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
    asked: Optional[DistillConfig] = None  # the config as given (metrics.json), before its batch was resolved

    @property
    def need_cls(self) -> bool:
        return self.beta > 0 and self.k > 1


def _plan(config: DistillConfig, source: BatchSource) -> _Plan:
    config.check()
    meta = source.meta
    task = _store_task(meta, config)
    k = config.student_layers
    lmap = layer_map(source.teacher_layers, k, config.strategy, config.layer_map)
    source.num_examples(config.train_split)  # names the store's splits if this one is missing
    eval_splits = config.eval_splits or [s for s in source.splits if s != config.train_split]
    if not eval_splits:
        raise PkdCacheError(f"store {config.store} has no dev split to evaluate on "
                            f"(splits: {', '.join(source.splits)})")
    init = config.student_init or meta.teacher.base_model
    if not init:
        raise PkdCacheError("the store does not record the teacher's base model; pass --student-init")
    main_metric_key(task, eval_splits, config.train.metric_for_best_model)  # an unknown metric: refused now
    if config.do_predict and config.data_dir is not None:  # missing test files: refused before training
        for split in test_splits(task):
            find_split_file(task, split, config.data_dir)
    beta = config.beta if config.beta is not None else 100.0 / source.hidden_size
    inputs = model_inputs(config.store, meta.teacher, ("the teacher", config.teacher), ("--student-init", init),
                          ("--data-dir", config.data_dir))
    if not config.resume:
        check_output_dir(config.output_dir, config.overwrite, "student", inputs=inputs)
    else:
        check_inputs(Path(config.output_dir), inputs, "--output-dir", config.output_dir)
        if checkpoint.load(resume_dir(config.output_dir)) is None:
            raise PkdCacheError(f"--resume: no checkpoint in {config.output_dir} to continue from")
    return _Plan(config, task, k, lmap, beta, init, eval_splits, inputs)


def pass_settings(config: DistillConfig) -> dict:
    """The settings (PASS_KEYS) that fix a student's batches: students with equal ones can train in one pass over
    the store (`distill_many`); `sweep` groups its runs by them."""
    flat = {**to_dict(config), **to_dict(config.train)}
    return {k: flat.get(k) for k in PASS_KEYS}


def distill(config: DistillConfig) -> dict:
    """Train the student, keep the best dev checkpoint in `config.output_dir`; returns the metrics."""
    return distill_many([config])[0]


def distill_many(configs: list[DistillConfig], description: str = "distill", hint: bool = True) -> list[dict]:
    """Train several students in one pass over the store: each batch is read and decompressed once, then every
    student takes its step on it. Each student trains exactly as it would alone (own seed, RNG, optimiser,
    checkpoint, metrics.json); they must share the store, batch size, seed, epochs and max steps."""
    if not configs:
        return []
    # an id names a store of the cache (store/cache.py): the checks below compare folders with its real place
    configs = [dataclasses.replace(c, store=resolve_store(c.store, None)) if c.store else c for c in configs]
    if configs[0].fp16 and resolve_device(configs[0].device).type not in FP16_DEVICES:
        raise PkdCacheError(f"--fp16 needs a CUDA GPU (its loss scaling is CUDA's), and this run is on "
                            f"{resolve_device(configs[0].device).type}; use --bf16, or neither")
    token_store = _token_store(configs[0])
    if token_store is not None:  # `dump --task lm`: causal-LM students (commands/distill_lm.py), one at a time
        from .distill_lm import distill_lm, plan_lm

        stores = [token_store if c.store == configs[0].store else _token_store(c) for c in configs]
        plans = [plan_lm(c, s) for c, s in zip(configs, stores)]  # every run checked before the first one trains
        return [distill_lm(p) for p in plans]
    if configs[0].max_tokens is not None:
        raise PkdCacheError(f"--max-tokens is for token stores (dump --task lm); {configs[0].store or 'online KD'} "
                            f"is a store of examples: use --batch-size")
    resume = _check_pass(configs)
    dist = dist_context(resolve_device(configs[0].device))
    asked, configs = configs, [_resolved_batch(c, dist.world) for c in configs]
    # log lines and bars from rank 0 only
    with process_group(dist.ranks, dist.device), quiet(not dist.main), contextlib.ExitStack() as locks:
        source = open_source(configs[0], dist.device)
        # every check before any model is built or folder written
        plans = [dataclasses.replace(_plan(c, source), asked=a) for c, a in zip(configs, asked)]
        if dist.main:  # one run writes an output folder at a time: held until the students are in place
            for p in plans:
                locks.enter_context(OutputLock(Path(p.config.output_dir), p.config.output_dir))
        dist.barrier()  # every rank has checked the output folders before rank 0 prepares them
        layers = sorted({layer for p in plans if p.need_cls for layer in p.lmap})
        students = [_Student(p, source, layers, len(plans) > 1, dist) for p in plans]
        for s in students:
            s.hint = hint and len(plans) == 1  # a `next:` line after a lone student (sweep reports its own way)
            s.pass_students = len(plans)  # the students sharing this pass's wall time
        metrics = _train_pass(students, _PassBatches(source, configs[0], layers, dist), description, resume)
        dist.barrier()  # every rank returns once rank 0 has written the students
    return metrics


def check_runs(configs: list[DistillConfig], names: list[str]) -> None:
    """Every check `distill_many` makes before it builds a model, for students that train in different passes over
    one store (a sweep's runs, `names`): a setting only the store can refuse (more layers than its teacher has, a
    layer it does not hold) fails before the first of them trains, not after the runs before it have."""
    if not configs:
        return
    configs = [dataclasses.replace(c, store=resolve_store(c.store, None)) for c in configs]
    token_store = _token_store(configs[0])
    if token_store is not None:
        from .distill_lm import plan_lm

        check = lambda c: plan_lm(c, token_store)  # noqa: E731
    else:
        source = open_source(configs[0], resolve_device(configs[0].device))
        world = dist_context(resolve_device(configs[0].device)).world
        check = lambda c: _plan(_resolved_batch(c, world), source)  # noqa: E731
    for c, name in zip(configs, names):
        try:
            check(c)
        except PkdCacheError as e:
            raise PkdCacheError(f"run {name}: {e}") from None


def _token_store(config: DistillConfig):
    """The store of `config` opened, if it is a token store (format version 2, `layout: tokens`); else None."""
    if not config.store:
        return None
    from ..store.registry import read_metadata
    from ..store.location import Location

    meta = read_metadata(Location(config.store))
    if not isinstance(meta, dict) or meta.get("layout") != "tokens":
        return None
    from ..store.reader import open_store

    return open_store(config.store, allow_no_checksums=config.allow_no_checksums)


def _resolved_batch(config: DistillConfig, world: int) -> DistillConfig:
    """The config with its global batch, rows per forward and accumulation steps resolved for `world` ranks (as
    the Trainer counts them: per-device x ranks x accumulation; config.resolve_batch)."""
    batch, per_device, steps = resolve_batch(config.train.batch_size, config.per_device_train_batch_size,
                                             config.gradient_accumulation_steps, world)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch),
                               per_device_train_batch_size=per_device, gradient_accumulation_steps=steps)


def _check_pass(configs: list[DistillConfig]) -> bool:
    """The students of one pass share their batches, not their folders, and all resume or all start; whether
    they resume."""
    first = pass_settings(configs[0])
    for c in configs[1:]:
        diff = [k for k, v in pass_settings(c).items() if v != first[k]]
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
    return resume.pop()


def _train_pass(students: list[_Student], batches: _PassBatches, description: str, resume: bool) -> list[dict]:
    """Train every student on the same batches; write each one's metrics and put it in place."""
    train_cfg = students[0].plan.config.train
    t0 = time.perf_counter()
    try:
        results = train_many([s.member for s in students], len(batches.sizes), batches, description=description,
                             save_steps=train_cfg.save_steps, resume=resume)
        return [s.finish(result, time.perf_counter() - t0) for s, result in zip(students, results)]
    except BaseException:
        for s in students:  # a failed run: the old output stays, a resumable checkpoint too
            if s.member.reporter is not None:  # its wandb/mlflow run ends as failed (not left open to the next)
                s.member.reporter.close(failed=True)
            if s.output is not None:
                s.output.abandon()
        raise


GLOBAL_ROWS = "_global_rows"  # under torchrun: the rows of the whole batch this rank's part belongs to


class _PassBatches:
    """`epoch_batches` of a pass: this rank's part of each training batch, with the CLS rows of `layers`."""

    def __init__(self, source: BatchSource, config: DistillConfig, layers: list[int], dist: DistContext):
        self.source, self.config, self.layers, self.dist = source, config, layers, dist
        self.fields = ("input_ids", "attention_mask", "token_type_ids", "labels", "logits") + \
            (("cls",) if layers else ())
        self.sizes = batch_sizes(source.num_examples(config.train_split), config.train.batch_size, dist.world)

    def __call__(self, epoch: int, start_batch: int = 0):
        cfg, dist = self.config, self.dist
        batches = self.source.batches(cfg.train_split, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                      epoch=epoch, layers=self.layers or None, fields=self.fields,
                                      pin_memory=dist.device.type == "cuda", start_batch=start_batch,
                                      shard=(dist.rank, dist.world), workers=cfg.dataloader_num_workers)
        if not (dist.many or cfg.per_device_train_batch_size):
            return batches
        return ({**b, GLOBAL_ROWS: self.sizes[start_batch + i]} for i, b in enumerate(batches))


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


class _Student:
    """The student of a plan: built, trained as `member` (its loss, evaluation and best checkpoint below), and
    finished by `finish`, which writes its metrics and puts it in place."""

    def __init__(self, plan: _Plan, source: BatchSource, layers: list[int], named: bool, dist: DistContext):
        config = plan.config
        self.plan, self.source, self.dist, self.meta = plan, source, dist, source.meta
        torch.manual_seed(config.train.seed)
        self.student = build_student(plan.init, plan.task, plan.k, self.meta.tokenizer.vocab_fingerprint)
        self.model = self.student.model
        self.widths = self.model.config.hidden_size, source.hidden_size  # student's, teacher's
        self.projection = None
        if plan.need_cls and self.widths[0] != self.widths[1]:  # a narrower (or wider) student: learn a map
            self.projection = torch.nn.Linear(*self.widths, bias=False)
        # everything has loaded: start the output (aside, when it replaces one), or continue the interrupted one
        self.output = None if not dist.main else resume_output(config.output_dir, "student", "distill") \
            if config.resume else prepare_output(config.output_dir, config.overwrite, "student", "distill",
                                                 inputs=plan.inputs)
        self.out = self.output.work if self.output is not None else resume_dir(config.output_dir)  # others read
        self.model.to(dist.device)
        if self.projection is not None:
            self.projection.to(dist.device)
        self.weights = LossWeights(alpha=config.alpha, beta=plan.beta, temperature=config.kd_temperature)
        self.positions = [layers.index(layer) for layer in plan.lmap] if plan.need_cls else []
        self.all_layers = self.positions == list(range(len(layers)))  # the batch's CLS rows are this student's
        self._log_start()
        self.forward, accumulation = self._wrap(_Trainable(self.model, self.projection, plan.k, plan.need_cls))
        self.student.tokenizer.model_max_length = self.meta.max_seq_length  # `eval` scores at this length
        self.main_key = main_metric_key(plan.task, plan.eval_splits, config.train.metric_for_best_model)
        steps_per_epoch = len(batch_sizes(source.num_examples(config.train_split), config.train.batch_size,
                                          dist.world))
        extra = list(self.projection.named_parameters(prefix="cls_projection")) if self.projection is not None \
            else None
        self.member = Member(self.model, config.train, total_steps_of(config.train, steps_per_epoch), self.loss,
                             self.evaluate, self.main_key, self.save_best, extra,
                             name=Path(config.output_dir).name if named else "", output_dir=self.out,
                             accumulation=accumulation, dist=dist, scaler=self._scaler(), reporter=self._reporter())

    def _log_start(self) -> None:
        plan, config = self.plan, self.plan.config
        log(f"distilling a {plan.k}-layer student from {plan.init} on {plan.task.name} into {config.output_dir}: "
            f"layer map {plan.lmap} of {self.source.teacher_layers} teacher layers, alpha {config.alpha:g}, "
            f"beta {plan.beta:g}, T {config.kd_temperature:g}"
            + (f", CLS projected {self.widths[0]} -> {self.widths[1]}" if self.projection is not None else "")
            + f"; batch {self._batch_in_words()}")

    def _batch(self) -> dict:
        """How the global batch is made (metrics.json's `batch`, the start line)."""
        config, world = self.plan.config, self.dist.world
        batch = config.train.batch_size
        return {"global": batch, "ranks": world, "per_device": config.per_device_train_batch_size or -(-batch // world),
                "gradient_accumulation_steps": config.gradient_accumulation_steps}

    def _batch_in_words(self) -> str:
        b, config = self._batch(), self.plan.config
        steps = b["gradient_accumulation_steps"] or 1
        if b["ranks"] == 1 and steps == 1 and not config.per_device_train_batch_size:
            return str(b["global"])
        return f"{b['global']} ({b['per_device']} per device x {b['ranks']} rank(s) x {steps} accumulation step(s))"

    def _wrap(self, trainable: _Trainable) -> tuple[torch.nn.Module, Optional[Accumulation]]:
        """The module a step calls (DDP's wrapper under torchrun) and how a rank accumulates its part of a batch."""
        config, dist = self.plan.config, self.dist
        if not (dist.many or config.per_device_train_batch_size):
            return trainable, None
        split = _micro_batches(config.per_device_train_batch_size, dist.world)
        if not dist.many:
            return trainable, Accumulation(split)
        from torch.nn.parallel import DistributedDataParallel

        device = dist.device
        ddp = DistributedDataParallel(trainable, device_ids=[device] if device.type == "cuda" else None)
        torch.manual_seed(config.train.seed + dist.rank)  # dropout differs across ranks; rank 0's is a 1-rank run's
        return ddp, Accumulation(split, ddp.no_sync)

    def _reporter(self):
        """--report-to: rank 0's curves, the event files in the student's folder (`runs/`)."""
        config = self.plan.config
        if not config.report_to or not self.dist.main:
            return None
        from ..reporting import Reporter

        return Reporter(config.report_to, self.out, Path(config.output_dir).name, to_dict(config))

    def _predict(self) -> list:
        """--do-predict: the best student (the one saved) on the test split(s)."""
        from transformers import AutoModelForSequenceClassification

        from .predict import write_predictions

        config = self.plan.config
        best = AutoModelForSequenceClassification.from_pretrained(self.out).to(self.dist.device)
        return write_predictions(best, self.student.tokenizer, self.plan.task, self.out, config.data_dir,
                                 self.meta.max_seq_length, config.per_device_eval_batch_size, self.dist.device)

    def _scaler(self):
        """fp16's loss scaling (a GradScaler on the run's device: CUDA, or the tests' CPU); None otherwise."""
        return torch.amp.GradScaler(self.dist.device.type) if self.plan.config.fp16 else None

    def loss(self, batch: dict):
        """The PKD loss of a batch (the single loss seam, student/losses.py). With --fp16/--bf16 the student's
        forward runs under autocast; the loss is computed in float32."""
        device, config = self.dist.device, self.plan.config
        half = torch.float16 if config.fp16 else torch.bfloat16 if config.bf16 else None
        with torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext():
            logits, s_cls = self.forward(**to_model_inputs(batch, device))
        if half is not None:
            logits, s_cls = logits.float(), s_cls.float() if s_cls is not None else None
        on_device = {key: batch[key].to(device, non_blocking=True) for key in ("labels", "logits")}
        if self.plan.need_cls:
            cls = batch["cls"] if self.all_layers else batch["cls"][:, self.positions]
            on_device["cls"] = cls.to(device, non_blocking=True)
        return pkd_loss(logits, s_cls, on_device, self.weights, self.plan.task.is_regression)

    def evaluate(self) -> dict:
        size = self.plan.config.per_device_eval_batch_size
        batches = {s: self.source.batches(s, size, shuffle=False, fields=EVAL_FIELDS) for s in self.plan.eval_splits}
        counts = {s: -(-self.source.num_examples(s) // size) for s in self.plan.eval_splits}
        return score(self.model, batches, self.plan.task, self.dist.device, counts)

    def save_best(self) -> None:  # the projection is a training aid: not part of the saved student
        self.model.save_pretrained(self.out)
        self.student.tokenizer.save_pretrained(self.out)
        self.output.record()  # these files are pkd-cache's: a later --overwrite may replace them

    def finish(self, result: TrainResult, seconds: float) -> dict:
        """The student's metrics; on rank 0 also written, and the student put in place."""
        plan, config = self.plan, self.plan.config
        metrics = {"task": plan.task.name, "store": config.store, "online_teacher": config.teacher,
                   "student_init": plan.init, "student_layers": plan.k,
                   "layer_map": plan.lmap, "alpha": config.alpha, "beta": plan.beta,
                   "temperature": config.kd_temperature,
                   "cls_projection": list(self.widths) if self.projection else None,
                   "best_epoch": result.best_epoch, "best_step": result.best_step,
                   "best_" + self.main_key: result.best_metric,
                   "history": result.history, "steps": result.steps, "wall_seconds": seconds,
                   "pass_students": self.pass_students,  # wall_seconds is the pass's, shared by these students
                   "teacher_weights_fingerprint": self.meta.teacher.weights_fingerprint,
                   "config": to_dict(plan.asked or config), "ranks": self.dist.world,
                   "batch": self._batch()}
        if not self.dist.main:
            return metrics
        if config.do_predict:
            metrics["predictions"] = [p.name for p in self._predict()]
        write_metrics(self.out, metrics)
        write_model_card(self.out, Path(config.output_dir).name, metrics, plan.task,
                         self.meta if config.teacher is None else None)
        checkpoint.remove(self.out)  # finished: the resume aid goes
        final = self.output.commit()  # in place only now: the student it replaces was kept until here
        log(f"best {self.main_key} {result.best_metric:.4f} (epoch {result.best_epoch}); student saved to {final}")
        if self.hint:
            log(f"next: pkd-cache eval --model {final} --task {plan.task.name}")
        return metrics


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
