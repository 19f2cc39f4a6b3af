"""One student of a distill pass (commands/distill.py): built from its plan, its loss on a batch of the store (the
PKD loss, student/losses.py), its evaluation and best checkpoint, and `finish`, which writes its metrics and puts it
in place; and the pass's batches, this rank's part of each under torchrun.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from .. import checkpoint
from ..config import DistillConfig, to_dict
from ..data.tokenize import to_model_inputs
from ..distributed import DistContext
from ..progress import log
from ..sources import BatchSource
from ..store.format import TOKEN_DTYPES
from ..store.stream import batch_sizes, trim_padding
from ..student.init import build_student, student_cls
from ..student.losses import LossWeights, pkd_loss
from ..training import Accumulation, Member, TrainResult, total_steps_of, write_metrics
from .evaluate import main_metric_key, score
from .model_card import write_model_card
from .paths import prepare_output, resume_dir, resume_output

if TYPE_CHECKING:
    from .distill import _Plan

EVAL_FIELDS = tuple(TOKEN_DTYPES) + ("labels",)

GLOBAL_ROWS = "_global_rows"  # under torchrun: the rows of the whole batch this rank's part belongs to


class PassBatches:
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


class PassStudent:
    """The student of a plan: built, trained as `member` (its loss, evaluation and best checkpoint below), and
    finished by `finish`, which writes its metrics and puts it in place."""

    def __init__(self, plan: "_Plan", source: BatchSource, layers: list[int], named: bool, dist: DistContext):
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
