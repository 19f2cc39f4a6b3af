"""The training loop shared by teacher fine-tuning and student distillation (nanoGPT-style, no Trainer).

The caller supplies how to get an epoch of batches, the loss of a batch and how to evaluate; this module
owns the optimiser (AdamW with decoupled weight decay), the linear warm-up/decay schedule, logging,
keeping the best dev checkpoint and writing metrics.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import checkpoint
from .config import TrainConfig, check_device
from .distributed import DistContext
from .errors import PkdCacheError
from .progress import log, progress_bar


@dataclass
class TrainResult:
    best_metric: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    best_step: int = -1
    steps: int = 0
    train_seconds: float = 0.0


def resolve_device(name: Optional[str]) -> torch.device:
    if name:
        check_device(name)  # one line for cuda without CUDA, `gpu`, cuda:7 of 2 ... (configs check it earlier too)
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, total_steps: int):
    """AdamW without decay on biases and LayerNorm weights; linear warm-up, then (`lr_scheduler_type`, the
    Trainer's names) linear decay to 0, cosine decay to 0, or constant."""
    decay = [p for n, p in params if p.requires_grad and not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in params if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel (CPU and CUDA), as the Trainer's default optimiser: the per-tensor loop cost ~18% of a
        # 3-layer MiniLM step on CPU (benchmarks/RESULTS.md, bench_trainer)
        opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        opt = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    warmup = int(cfg.warmup_ratio * total_steps)

    kind = cfg.lr_scheduler_type

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if kind == "constant_with_warmup":
            return 1.0
        left = max(0.0, (total_steps - step) / max(1, total_steps - warmup))  # 1 -> 0 after the warm-up
        return left if kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


@dataclass(frozen=True)
class Accumulation:
    """Gradient accumulation (under torchrun, --gradient-accumulation-steps or a per-device size): `split` cuts this
    rank's part of a batch into (micro-batch, loss weight); `no_sync` is the DDP wrapper's, so that only the last
    micro-batch all-reduces."""

    split: Callable[[dict], list[tuple[dict, float]]]
    no_sync: Optional[Callable[[], Any]] = None

    def backward(self, batch: dict, loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
                 scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss):
        """Backward over every micro-batch (`scale`: fp16's loss scaling); (the last micro-batch's loss parts, each
        value summed over them)."""
        micros = self.split(batch)
        watched: dict[str, torch.Tensor] = {}
        for i, (micro, weight) in enumerate(micros):
            last = i == len(micros) - 1
            with contextlib.nullcontext() if last or self.no_sync is None else self.no_sync():
                loss, parts = loss_fn(micro)
                scale(loss * weight).backward()  # the weights make the all-reduced gradient the batch's mean
            for k, v in {"loss": loss.detach(), **parts}.items():  # a nan in any micro-batch stays a nan
                watched[k] = watched[k] + v if k in watched else v
        return parts, watched


def total_steps_of(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = math.ceil(cfg.epochs * steps_per_epoch)
    return min(total, cfg.max_steps) if cfg.max_steps > 0 else total


class Member:
    """One model in training: its optimiser and schedule, its loss, evaluation and best checkpoint, its RNG.

    Several members can train on the same batches (one store read for all, `train_many`). Each keeps its own
    torch RNG state (dropout), swapped in around its step, so a member trains exactly as it would alone.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int,
                 loss_fn: Callable[[dict], tuple[torch.Tensor, dict]], evaluate: Callable[[], dict], main_metric: str,
                 save_best: Callable[[], None], extra_params: Optional[list[tuple[str, torch.nn.Parameter]]] = None, *,
                 name: str = "", output_dir: Optional[Path] = None, accumulation: Optional[Accumulation] = None,
                 dist: DistContext = DistContext(), scaler: Optional[Any] = None, reporter: Optional[Any] = None,
                 greater_is_better: bool = True):
        """Under torchrun (`dist`): `accumulation` cuts this rank's part of a batch into micro-batches, only rank 0
        evaluates, saves and writes checkpoints, and the other ranks' RNG states are gathered into rank 0's
        checkpoint, so a resumed run keeps each rank's dropout stream. `scaler`: fp16's GradScaler, which scales the
        loss and skips a step whose gradients overflowed (its scale is saved in the checkpoint)."""
        self.scaler, self.reporter = scaler, reporter  # reporter: --report-to (reporting.Reporter)
        self.accumulation, self.dist, self.rank, self.main = accumulation, dist, dist.rank, dist.main
        self.model, self.cfg, self.total_steps, self.name = model, cfg, total_steps, name
        self.output_dir, self.extra = output_dir, list(extra_params or [])
        self.loss_fn, self.evaluate, self.main_metric, self.save_best = loss_fn, evaluate, main_metric, save_best
        self.params = list(model.named_parameters()) + list(extra_params or [])
        self.opt, self.sched = build_optimizer(self.params, cfg, total_steps)
        self.greater_is_better = greater_is_better  # the Trainer's: False for a loss (token stores: eval_loss)
        self.result = TrainResult(best_metric=-math.inf if greater_is_better else math.inf, best_epoch=-1)
        self.running: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self.rng = checkpoint.rng_state()  # the state right after the caller seeded and built the model
        # the first step whose loss (or a part of it, or the gradient norm) was not finite: see `_watch`
        self.eager_finite_check: Optional[bool] = None  # None: on CPU only (tests force the GPU way with False)
        self._watch_names: tuple[str, ...] = ()
        self._bad_step: Optional[torch.Tensor] = None
        self._bad_values: Optional[torch.Tensor] = None

    def step(self, batch: dict) -> None:
        checkpoint.set_rng_state(self.rng)
        self.opt.zero_grad(set_to_none=True)
        scale = self.scaler.scale if self.scaler is not None else (lambda loss: loss)
        if self.accumulation is None:
            loss, parts = self.loss_fn(batch)  # forward + loss (the caller's single loss seam)
            scale(loss).backward()
            watched = {"loss": loss.detach(), **parts}
        else:
            parts, watched = self.accumulation.backward(batch, self.loss_fn, scale)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # true gradients, to clip; an overflow is the scaler's to skip
        if self.cfg.max_grad_norm > 0:  # clip; the norm is non-finite when a gradient is
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.max_grad_norm)
            if self.scaler is None:
                watched["grad_norm"] = norm
        self._watch(self.step_count + 1, watched)  # on CPU this stops before the optimiser takes a nan in
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.rng = checkpoint.rng_state()
        self.step_count += 1
        # log: the loss parts stay on the device and are summed there; the host syncs once per log line
        for k, v in parts.items():
            self.running[k] = self.running[k] + v if k in self.running else v
        every = self.cfg.logging_steps
        if every > 0 and self.step_count % every == 0:
            self.check_finite()  # the host syncs here anyway
            avg = ", ".join(f"{k} {float(v) / every:.4f}" for k, v in self.running.items())
            if self.reporter is not None:
                self.reporter.log(self.step_count, {**{f"train/{k}": float(v) / every for k, v in self.running.items()},
                                                    "train/learning_rate": self.sched.get_last_lr()[0]})
            log(f"{self.name + ': ' if self.name else ''}step {self.step_count}/{self.total_steps}  {avg}  "
                f"lr {self.sched.get_last_lr()[0]:.2e}")
            self.running = {}

    def _watch(self, step: int, values: dict[str, torch.Tensor]) -> None:
        """Remember the first step at which one of `values` (the loss, its parts, the gradient norm) is not finite.

        On CPU it raises at once. On a GPU a check per step would cost a host sync per step, so the step and its
        values are kept on the device (torch.where, no sync) and `check_finite` reads them at each log line and
        before anything is saved."""
        names = tuple(values)
        vals = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        bad = ~torch.isfinite(vals).all()
        eager = self.eager_finite_check
        if eager or (eager is None and vals.device.type == "cpu"):
            if bad:
                self._raise_nonfinite(step, names, vals)
            return
        if names != self._watch_names:  # another layout of the values (rare): settle the old one first
            self.check_finite()
            self._watch_names, self._bad_step = names, torch.full((), -1, dtype=torch.long, device=vals.device)
            self._bad_values = torch.zeros_like(vals)
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_values = torch.where(first, vals, self._bad_values)

    def check_finite(self) -> None:
        """Raise if a step so far had a non-finite loss, loss part or gradient norm (one host sync)."""
        if self._bad_step is not None and int(self._bad_step) >= 0:
            self._raise_nonfinite(int(self._bad_step), self._watch_names, self._bad_values)

    def check_weights(self) -> None:
        """Raise if any weight is not finite: called before every save, so a broken model is never written."""
        self.check_finite()
        ok = torch.stack([torch.isfinite(p.detach()).all() for _, p in self.params]).tolist()
        broken = [n for (n, _), fine in zip(self.params, ok) if not fine]
        if broken:
            raise PkdCacheError(f"{self._who()}after step {self.step_count}/{self.total_steps} the weights are not "
                                f"finite ({broken[0]}{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); "
                                f"stopped without saving them (try a lower --learning-rate)")

    def _raise_nonfinite(self, step: int, names: tuple[str, ...], vals: torch.Tensor) -> None:
        values = dict(zip(names, vals.tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        # the first cause: a loss part, else the total (a sum can overflow), else the gradients (a bad loss makes them
        # bad too, so they are named only when the loss was finite)
        culprits = [k for k in bad if k not in ("loss", "grad_norm")] or [k for k in bad if k == "loss"] or bad
        raise PkdCacheError(f"{self._who()}step {step}/{self.total_steps}: "
                            + ", ".join(f"{k} is {values[k]}" for k in culprits)
                            + " (not finite); stopped without saving this model (try a lower --learning-rate; "
                              "check the other settings and the input values)")

    def _who(self) -> str:
        return f"{self.name}: " if self.name else ""

    def other_ranks_rng(self) -> list[dict]:
        """Ranks 1..W-1's RNG states (JSON), gathered: a collective, so every rank calls it at the same step."""
        return self.dist.gather(checkpoint.rng_to_json(self.rng))[1:]

    def state(self, other_ranks_rng: list[dict] = ()) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to continue bit for bit: weights, optimiser, schedule, fp16's loss scale (a fresh
        scaler would start again at 2**16 and skip steps to find it), RNG (this rank's and, under torchrun,
        `other_ranks_rng`), results so far."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"extra.{k}": p for k, p in self.extra})
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            tensors.update({f"opt.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in st.items()})
        cpu, cuda = self.rng
        tensors["rng.cpu"] = cpu
        for i, t in enumerate(cuda or []):
            tensors[f"rng.cuda.{i}"] = t
        for r, rng in enumerate(other_ranks_rng, start=1):
            cpu_r, cuda_r = checkpoint.rng_from_json(rng)
            tensors[f"rng.rank{r}.cpu"] = cpu_r
            tensors.update({f"rng.rank{r}.cuda.{i}": t for i, t in enumerate(cuda_r or [])})
        sched = {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"}
        meta = {"param_groups": opt["param_groups"], "scheduler": sched, "step_count": self.step_count,
                "best_metric": self.result.best_metric, "best_epoch": self.result.best_epoch,
                "history": self.result.history, "cuda_rng": len(cuda or []), "rng_ranks": 1 + len(other_ranks_rng),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}  # plain numbers
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        with torch.no_grad():
            for k, p in self.extra:
                p.copy_(tensors[f"extra.{k}"])
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(self.opt.param_groups)})
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.rng = self._saved_rng(tensors, meta)
        self.step_count = meta["step_count"]
        self.result.best_metric, self.result.best_epoch = meta["best_metric"], meta["best_epoch"]
        self.result.history = meta["history"]

    def _saved_rng(self, tensors: dict[str, torch.Tensor], meta: dict) -> tuple:
        """This rank's RNG state in a checkpoint. A rank the checkpoint has no state for (it was written with fewer
        ranks) gets a fresh stream of its own, seeded from (seed, rank, step), rather than a copy of rank 0's."""
        prefix = "rng." if self.rank == 0 else f"rng.rank{self.rank}."
        if self.rank < meta.get("rng_ranks", 1):
            cuda = [tensors[f"{prefix}cuda.{i}"] for i in range(meta.get("cuda_rng", 0))] or None
            return tensors[f"{prefix}cpu"], cuda
        torch.manual_seed(((self.cfg.seed * 1_000_003 + self.rank) * 1_000_003 + meta["step_count"]) % 2**63)
        return checkpoint.rng_state()

    def evaluate_and_keep(self, epoch: int, when: str) -> None:
        """Score the dev sets now (`when`: "epoch 2", "step 300"); keep the checkpoint if it is the best so far by
        the main metric (the main rank only)."""
        self.check_weights()  # every rank: the gradients were all-reduced, so a nan reaches them all alike
        if not self.main:
            return
        metrics = self.evaluate()
        self.result.history.append({"epoch": epoch + 1, "step": self.step_count, **metrics})
        if self.reporter is not None:
            self.reporter.log(self.step_count, {f"eval/{k}": v for k, v in metrics.items()})
        score = metrics[self.main_metric]
        better = score > self.result.best_metric if self.greater_is_better else score < self.result.best_metric
        log(f"{self.name + ': ' if self.name else ''}{when}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + ("  (best so far, saved)" if better else ""))
        if better:
            self.result.best_metric, self.result.best_epoch = score, epoch + 1
            self.result.best_step = self.step_count
            self.save_best()
        self.model.train()


def train_many(members: list[Member], steps_per_epoch: int, epoch_batches: Callable[..., Iterable[dict]],
               description: str = "train", save_steps: int = 0, resume: bool = False) -> list[TrainResult]:
    """Train every member on the same batches (they share epochs and max steps), evaluating after each epoch.

    With an `output_dir` per member, a checkpoint is written every `save_steps` steps and after each epoch, and
    `resume` continues from it: `epoch_batches(epoch, start_batch)` must then skip the batches already seen.
    """
    total_steps = members[0].total_steps
    if any(m.total_steps != total_steps for m in members):
        raise ValueError("members of one pass must train for the same number of steps")
    step, start_epoch, start_batch = 0, 0, 0
    if resume:
        step, start_epoch, start_batch = _resume(members)
    t0 = time.perf_counter()
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    cfg = members[0].cfg
    every = (cfg.eval_steps or cfg.logging_steps or steps_per_epoch) if cfg.eval_strategy == "steps" else 0
    for epoch in range(start_epoch, n_epochs):
        for m in members:
            m.model.train()
        first = start_batch if epoch == start_epoch else 0
        steps_this_epoch = min(steps_per_epoch, total_steps - (step - first))
        with progress_bar(steps_this_epoch, f"{description} epoch {epoch + 1}/{n_epochs}", unit="step") as bar:
            if first:
                bar.advance(first)  # seen before the interruption
            for batch in epoch_batches(epoch, first) if first else epoch_batches(epoch):
                if step >= total_steps or bar.done >= steps_this_epoch:  # stop: max steps or a fractional epoch
                    break
                for m in members:
                    m.step(batch)
                step += 1
                bar.advance(1)
                if every and step % every == 0:
                    for m in members:
                        m.evaluate_and_keep(epoch, f"step {step}")
                if save_steps > 0 and step % save_steps == 0 and bar.done < steps_this_epoch:
                    _save_checkpoints(members, {"epoch": epoch, "batch": bar.done, "step": step})
        last = epoch == n_epochs - 1
        # --eval-strategy: each epoch; or every `every` steps and after the last; or only after the last ("no")
        if cfg.eval_strategy == "epoch" or (last and not (every and step % every == 0)):
            for m in members:
                m.evaluate_and_keep(epoch, f"epoch {epoch + 1}" if cfg.eval_strategy == "epoch" else f"step {step}")
        _save_checkpoints(members, {"epoch": epoch + 1, "batch": 0, "step": step})
    for m in members:
        m.result.steps, m.result.train_seconds = step, time.perf_counter() - t0
        if m.reporter is not None:
            m.reporter.close()
    return [m.result for m in members]


def _save_checkpoints(members: list[Member], position: dict) -> None:
    """Every member's checkpoint at `position` (epoch, batch in epoch, step), where `resume` continues."""
    for m in members:
        if m.output_dir is not None:
            m.check_weights()  # never a checkpoint of a non-finite model
            others = m.other_ranks_rng()  # on every rank; only rank 0 builds and writes the checkpoint
            if m.main:
                tensors, meta = m.state(others)
                checkpoint.save(m.output_dir, tensors, {**meta, "position": position})
                if m.cfg.save_total_limit:
                    checkpoint.keep_snapshot(m.output_dir, position["step"], m.cfg.save_total_limit)


def _resume(members: list[Member]) -> tuple[int, int, int]:
    """Load every member's checkpoint; (step, epoch, batch in epoch) where they stopped, which must agree."""
    positions = set()
    for m in members:
        loaded = checkpoint.load(m.output_dir) if m.output_dir is not None else None
        if loaded is None:
            raise PkdCacheError(f"--resume: no checkpoint in {m.output_dir}")
        tensors, meta = loaded
        m.load_state(tensors, meta)
        pos = meta["position"]
        positions.add((pos["step"], pos["epoch"], pos["batch"]))
    if len(positions) != 1:
        raise PkdCacheError("--resume: the students of this pass stopped at different steps; resume them one by one")
    step, epoch, batch = positions.pop()
    log(f"resuming at step {step} (epoch {epoch + 1}, batch {batch})")
    return step, epoch, batch


def train(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int,
          epoch_batches: Callable[[int], Iterable[dict]], loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
          evaluate: Callable[[], dict], main_metric: str, save_best: Callable[[], None],
          extra_params: Optional[list[tuple[str, torch.nn.Parameter]]] = None,
          description: str = "train") -> TrainResult:
    """Train one model for cfg.epochs (a fractional last epoch is allowed), evaluating after each; keep the best."""
    member = Member(model, cfg, total_steps_of(cfg, steps_per_epoch), loss_fn, evaluate, main_metric, save_best,
                    extra_params)
    return train_many([member], steps_per_epoch, epoch_batches, description)[0]


@torch.inference_mode()
def predict(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
            to_inputs: Callable[[dict, torch.device], dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over all batches, model in eval mode."""
    model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(**to_inputs(batch, device)).logits.float().cpu())
        labels.append(batch["labels"])
    model.train()
    return torch.cat(logits), torch.cat(labels)


def write_metrics(output_dir: Path, payload: dict) -> None:
    path = Path(output_dir) / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
