"""`pkd-cache distill` from a token store (`dump --task lm`): a causal-LM student trained on the stored tokens and
the teacher's stored sparse targets, with no teacher in memory.

    loss = CE(next token) + alpha * KD(stored targets) [+ beta * hidden-state MSE on mapped layers]

An encoder `--student-init` (BERT and its kin; student/encoder.py) learns from the stored hidden states alone,
TinyBERT's general distillation: loss = beta * hidden-state MSE, the same module on the same batches.

KD is RS-KD's estimator on sample:N targets and top-K with the leftover bucket on topk:K targets, both at the
temperature the targets were dumped at (student/sparse_kd.py, docs/TOKEN_KD.md). The student is the first k blocks
of `--student-init` (default: the store's teacher). Batches are token budgets (store/token_stream.py): at most
`--max-tokens` real tokens per forward, by default the per-device batch x the store's max_seq_length (run_clm's
batches of block_size); with `--gradient-accumulation-steps G` an optimizer step takes G such forwards, each loss
weighted 1/G (the mean of the forwards' means, as DDP averages its ranks': G steps on one process and G ranks take the
same step).
The checkpoint kept is the one with the lowest loss on the store's validation split (CE, the student alone), or on
the first batches of the training split when the store has no validation split (said so in metrics.json).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Optional

import torch

from .. import checkpoint
from ..config import DistillConfig, resolve_batch, to_dict
from ..errors import PkdCacheError
from ..logit_spec import LogitSpec
from ..distributed import DistContext, dist_context, process_group
from ..progress import log, quiet
from ..store.token_stream import iter_token_batches, steps_per_epoch
from ..student.causal_lm import HiddenStateMSE, TokenKD, causal_lm_student, check_same_vocab
from ..models import load_config
from ..student.encoder import encoder_student, model_kind
from ..training import Accumulation, Member, resolve_device, total_steps_of, train_many, write_metrics
from .output_lock import OutputLock
from .paths import check_inputs, check_output_dir, model_inputs, prepare_output, resume_dir, resume_output

EVAL_BATCHES = 8  # training batches scored when the store has no validation split


def distill_lm(plan: "_Plan") -> dict:
    """Train the student `plan_lm` planned (one causal-LM or encoder student from an opened token store); returns
    its metrics.

    Under torchrun, DistributedDataParallel: rank r of W trains on batches r, r + W, ... of the epoch's plan
    (store/token_stream.py), so a step sees W token budgets; rank 0 evaluates, saves and writes the metrics."""
    config = plan.config
    dist = dist_context(resolve_device(config.device))
    with process_group(dist.ranks, dist.device), quiet(not dist.main), contextlib.ExitStack() as locks:
        if dist.main:
            locks.enter_context(OutputLock(Path(config.output_dir), config.output_dir))
        dist.barrier()  # every rank has checked the output folder before rank 0 prepares it
        student = _LMStudent(plan, dist)
        t0 = time.perf_counter()
        results = train_many([student.member], student.steps_per_epoch,
                             lambda epoch, start=0: plan.batches(epoch, start, dist), "distill",
                             config.train.save_steps, config.resume)
        metrics = student.finish(results[0], time.perf_counter() - t0)
        dist.barrier()  # every rank returns once rank 0 has written the student
    return metrics


def plan_lm(config: DistillConfig, store) -> "_Plan":
    """A student's settings resolved against the token store `store`, with every check made before anything is built
    or written (a sweep plans all its runs first)."""
    return _Plan(config, store, dist_context(resolve_device(config.device)).world)


class _Plan:
    """The student's settings resolved against the store; every check before anything is built or written."""

    def __init__(self, config: DistillConfig, store, world: int = 1):
        config.check()
        if config.teacher is not None:
            raise PkdCacheError("online KD (--teacher) is for sentence-level tasks; distil an LM from a token store")
        self.config, self.store, meta = config, store, store.meta
        lm = meta.lm
        self.spec = LogitSpec(lm["targets"]["kind"], int(lm["targets"].get("count") or 0))
        stored_t = lm["targets"].get("temperature")
        if config.temperature is not None and stored_t is not None and config.temperature != stored_t:
            raise PkdCacheError(f"--temperature {config.temperature:g}: the store's targets were drawn at temperature "
                                f"{stored_t:g}; KD on them uses that (drop --temperature, or dump again)")
        self.temperature = float(stored_t or 1.0)
        store.num_examples(config.train_split)  # names the store's splits if this one is missing
        self.eval_split = next((s for s in (config.eval_splits or ["validation"]) if s in store.splits), None)
        if config.eval_splits and self.eval_split is None:
            raise PkdCacheError(f"--eval-split {config.eval_splits[0]}: the store has {', '.join(store.splits)}")
        batch, per_device, self.accumulate = resolve_batch(config.train.batch_size, config.per_device_train_batch_size,
                                                           config.gradient_accumulation_steps, 1)
        self.max_tokens = config.max_tokens or (per_device or -(-batch // self.accumulate)) * meta.max_seq_length
        self.init = config.student_init or meta.teacher.name_or_path
        if not self.init:
            raise PkdCacheError("the store does not record its teacher; pass --student-init")
        self.k = config.student_layers
        self.beta = config.beta if config.beta is not None else 0.0
        self.alpha = config.alpha if self.spec.kind != "none" else 0.0
        self.encoder = model_kind(load_config(self.init)) == "encoder"
        if self.encoder:  # no LM head: hidden states are all it learns from
            if self.beta <= 0:
                raise PkdCacheError(f"--student-init {self.init} is an encoder: it learns from the store's hidden "
                                    f"states alone; pass --beta (e.g. --beta 1)")
            self.alpha = 0.0
        self.hidden_map = self._hidden_map(meta) if self.beta > 0 else {}
        self.steps_per_epoch = steps_per_epoch(store, config.train_split, self.max_tokens, world) // self.accumulate
        if self.steps_per_epoch < 1:
            raise PkdCacheError(f"--gradient-accumulation-steps {self.accumulate}: an epoch of {config.train_split} "
                                f"has fewer batches of {self.max_tokens:,} tokens per rank than that")
        self.inputs = model_inputs(config.store, meta.teacher, ("--student-init", self.init))
        if config.resume:
            check_inputs(Path(config.output_dir), self.inputs, "--output-dir", config.output_dir)
            if checkpoint.load(resume_dir(config.output_dir)) is None:
                raise PkdCacheError(f"--resume: no checkpoint in {config.output_dir} to continue from")
        else:
            check_output_dir(config.output_dir, config.overwrite, "student", inputs=self.inputs)

    def _hidden_map(self, meta) -> dict[int, int]:
        """{student layer: position among the stored hidden layers}: --layer-map names a teacher layer for each
        student layer 1..k (fewer: the first ones); by default student layer j takes teacher layer j L / k."""
        stored = list(meta.lm["hidden_layers"])
        if not stored:
            raise PkdCacheError(f"--beta {self.beta:g}: the store holds no hidden states (dump it with "
                                f"--hidden-layers)")
        teacher_layers = meta.teacher.num_layers
        wanted = self.config.layer_map or [round(j * teacher_layers / self.k) for j in range(1, self.k + 1)]
        if len(wanted) > self.k:
            raise PkdCacheError(f"--layer-map names {len(wanted)} teacher layers for a {self.k}-layer student")
        missing = [t for t in wanted if t not in stored]
        if missing:
            raise PkdCacheError(f"teacher layer {missing[0]} of the layer map {wanted} is not in the store (it holds "
                                f"layers {stored}); pass --layer-map with those, or dump with --hidden-layers")
        return {j: stored.index(t) for j, t in enumerate(wanted, start=1)}

    def batches(self, epoch: int, start_step: int = 0, dist: DistContext = DistContext()):
        """This rank's batches of the epoch from optimizer step `start_step` on: one token budget per step, or with
        accumulation a list of G consecutive ones (a last, incomplete group is left out, as `steps_per_epoch`
        counts)."""
        c, g = self.config, self.accumulate
        forwards = iter_token_batches(self.store, c.train_split, self.max_tokens, True, c.train.seed, epoch,
                                      start_batch=start_step * g, shard=(dist.rank, dist.world),
                                      hidden=bool(self.hidden_map), prefetch=0 if c.dataloader_num_workers == 0 else 2,
                                      workers=c.dataloader_num_workers,
                                      targets=self.alpha > 0)
        if g == 1:
            return forwards
        return (group for group in _groups(forwards, g) if len(group) == g)


def _groups(items, size: int):
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class _LMLoss(torch.nn.Module):
    """The student and its loss as one module: what DistributedDataParallel wraps under torchrun, so that the
    hidden-state projection's gradients are all-reduced with the student's."""

    def __init__(self, model, kd: Optional[TokenKD], mse: Optional[HiddenStateMSE], beta: float,
                 half: Optional[torch.dtype]):
        super().__init__()
        self.model, self.kd, self.mse, self.beta, self.half = model, kd, mse, beta, half

    def run(self, ids: torch.Tensor, mask: torch.Tensor, hidden: bool = False):
        """The student's forward, under autocast with --bf16 / --fp16 (the losses are taken in float32)."""
        with torch.autocast(ids.device.type, dtype=self.half) if self.half else contextlib.nullcontext():
            return self.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)

    def hidden_loss(self, out, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The hidden-state MSE of the student's outputs `out` against the stored [B, S, h, H] states."""
        return self.mse(out.hidden_states, [teacher_hidden[:, :, p] for p in range(teacher_hidden.shape[2])], mask)

    def forward(self, ids, mask, targets=None, teacher_hidden=None):
        out = self.run(ids, mask, hidden=self.mse is not None)
        loss, watched = None, {}
        if self.kd is not None:  # a causal LM (an encoder student has no LM head)
            loss, parts = self.kd(out.logits.float(), ids, mask, targets)
            watched = {"ce": parts["ce"], "kd": parts["kd"]}
        if self.mse is not None:
            hidden = self.hidden_loss(out, teacher_hidden, mask)
            loss = self.beta * hidden if loss is None else loss + self.beta * hidden
            watched["hidden"] = hidden.detach()
        return loss, watched


class _LMStudent:
    def __init__(self, plan: _Plan, dist: DistContext):
        self.plan, config, meta = plan, plan.config, plan.store.meta
        self.dist, self.device = dist, dist.device
        torch.manual_seed(config.train.seed)
        self.model = (encoder_student if plan.encoder else causal_lm_student)(plan.init, plan.k)
        check_same_vocab(self.model, meta.tokenizer.vocab_size, f"the store {config.store}")
        kd = None if plan.encoder else TokenKD("sample" if plan.spec.kind == "sample" else "topk"
                                               if plan.spec.kind == "topk" else "full", alpha=plan.alpha,
                                               temperature=plan.temperature)
        self.mse = HiddenStateMSE(plan.hidden_map, self.model.config.hidden_size, meta.teacher.hidden_size) \
            if plan.hidden_map else None
        # everything has loaded: rank 0 starts the output (aside, when it replaces one) or continues it
        self.output = None if not dist.main else resume_output(config.output_dir, "student", "distill") \
            if config.resume else prepare_output(config.output_dir, config.overwrite, "student", "distill",
                                                 inputs=plan.inputs)
        self.out = self.output.work if self.output is not None else resume_dir(config.output_dir)
        self.model.to(self.device)
        extra = None
        if self.mse is not None:
            self.mse.to(self.device)
            extra = list(self.mse.named_parameters(prefix="hidden_projection"))
        half = torch.float16 if config.fp16 else torch.bfloat16 if config.bf16 else None
        self.trainable = _LMLoss(self.model, kd, self.mse, plan.beta, half)
        self.forward, no_sync = self.trainable, None
        if dist.many:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.trainable, device_ids=[self.device]
                                                   if self.device.type == "cuda" else None)
            no_sync = self.forward.no_sync
        accumulation = None if plan.accumulate == 1 else \
            Accumulation(lambda group: [(b, 1.0 / len(group)) for b in group], no_sync)
        loss = [] if plan.encoder else [f"CE + {plan.alpha:g} x KD ({plan.spec}, T {plan.temperature:g})"]
        log(f"distilling a {plan.k}-layer {'encoder' if plan.encoder else 'causal-LM'} student from {plan.init} on "
            f"{config.store} into {config.output_dir}: " + " + ".join(loss + (
                [f"{plan.beta:g} x hidden MSE (student->teacher layers "
               f"{ {j: meta.lm['hidden_layers'][p] for j, p in plan.hidden_map.items()} })"] if self.mse else []))
            + f"; batches of at most {plan.max_tokens:,} tokens"
            + (f", {plan.accumulate} per optimizer step" if plan.accumulate > 1 else ""))
        self.main_key = "eval_loss" if plan.eval_split else "train_subset_loss"
        self.steps_per_epoch = plan.steps_per_epoch
        self.member = Member(self.model, config.train, total_steps_of(config.train, self.steps_per_epoch), self.loss,
                             self.evaluate, self.main_key, self.save_best, extra, output_dir=self.out, dist=dist,
                             greater_is_better=False, accumulation=accumulation,
                             scaler=torch.amp.GradScaler(self.device.type) if config.fp16 else None)

    def loss(self, batch: dict):
        on = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        targets = None
        if self.plan.alpha > 0:
            second = "target_counts" if self.plan.spec.kind == "sample" else "target_logprobs"
            targets = (on["target_ids"], on[second])
        return self.forward(on["input_ids"], on["attention_mask"], targets, on.get("hidden"))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean next-token CE (and its perplexity) of the student alone on the evaluation tokens; for an encoder, the
        mean hidden-state MSE against the stored states (per token)."""
        plan, config = self.plan, self.plan.config
        self.model.eval()
        split = plan.eval_split or config.train_split
        batches = iter_token_batches(plan.store, split, plan.max_tokens, shuffle=False, targets=False,
                                     hidden=plan.encoder)
        total, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            if plan.eval_split is None and i >= EVAL_BATCHES:
                break
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            out = self.trainable.run(ids, mask, hidden=plan.encoder)
            if plan.encoder:
                n = int(mask.sum())
                total += float(self.trainable.hidden_loss(out, batch["hidden"].to(self.device), mask)) * n
                tokens += n
                continue
            valid = (mask[:, :-1] & mask[:, 1:]).bool()
            logits = out.logits[:, :-1][valid].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[:, 1:][valid], reduction="sum"))
            tokens += int(valid.sum())
        loss = total / max(1, tokens)
        prefix = "eval" if plan.eval_split else "train_subset"
        if plan.encoder:
            return {f"{prefix}_loss": loss}
        return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 700.0))}

    def save_best(self) -> None:
        from transformers import AutoTokenizer

        self.model.save_pretrained(self.out)
        tokenizer = self.plan.store.meta.tokenizer.name_or_path or self.plan.init
        with contextlib.suppress(Exception):  # a store from elsewhere may name a tokenizer this machine lacks
            AutoTokenizer.from_pretrained(tokenizer).save_pretrained(self.out)
        self.output.record()

    def finish(self, result, seconds: float) -> dict:
        plan, config, meta = self.plan, self.plan.config, self.plan.store.meta
        if not self.dist.main:
            return {"task": "lm", "rank": self.dist.rank}
        metrics = {"task": "lm", "student": "encoder" if plan.encoder else "causal-lm", "store": config.store,
                   "student_init": plan.init, "student_layers": plan.k,
                   "logits": str(plan.spec), "alpha": plan.alpha, "temperature": plan.temperature, "beta": plan.beta,
                   "hidden_layer_map": {j: meta.lm["hidden_layers"][p] for j, p in plan.hidden_map.items()},
                   "max_tokens": plan.max_tokens, "gradient_accumulation_steps": plan.accumulate,
                   "eval_split": plan.eval_split or f"{config.train_split} (first "
                   f"{EVAL_BATCHES} batches: the store has no validation split)",
                   "best_epoch": result.best_epoch, "best_step": result.best_step,
                   "best_" + self.main_key: result.best_metric, "history": result.history, "steps": result.steps,
                   "wall_seconds": seconds, "teacher_weights_fingerprint": meta.teacher.weights_fingerprint,
                   "ranks": self.dist.world, "config": to_dict(config)}
        write_metrics(self.out, metrics)
        checkpoint.remove(self.out)
        final = self.output.commit()
        if plan.encoder:
            log(f"best {self.main_key} {result.best_metric:.4f} (hidden-state MSE); student saved to {final}")
            log(f"next: pkd-cache finetune --model {final} --task <task> --output-dir <folder> (or distil on a task "
                f"with --student-init {final})")
        else:
            log(f"best {self.main_key} {result.best_metric:.4f} (perplexity "
                f"{math.exp(min(result.best_metric, 700)):.2f}); student saved to {final}")
            log(f"next: pkd-cache eval --model {final} --task lm --data-files <held-out corpus>")
        return metrics
