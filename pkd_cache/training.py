"""The training loop shared by teacher fine-tuning and student distillation (nanoGPT-style, no Trainer).

The caller supplies how to get an epoch of batches, the loss of a batch and how to evaluate; this module
owns the optimiser (AdamW with decoupled weight decay), the linear warm-up/decay schedule, logging,
keeping the best dev checkpoint and writing metrics.json.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .config import TrainConfig
from .progress import log, progress_bar


@dataclass
class TrainResult:
    best_metric: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0


def resolve_device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, total_steps: int):
    """AdamW without decay on biases and LayerNorm weights, linear warm-up then linear decay to 0."""
    decay = [p for n, p in params if p.requires_grad and not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in params if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    warmup = int(cfg.warmup_ratio * total_steps)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int,
          epoch_batches: Callable[[int], Iterable[dict]], loss_fn: Callable[[dict], tuple[torch.Tensor, dict]],
          evaluate: Callable[[], dict], main_metric: str, save_best: Callable[[], None],
          extra_params: Optional[list[tuple[str, torch.nn.Parameter]]] = None,
          description: str = "train") -> TrainResult:
    """Train for cfg.epochs (a fractional last epoch is allowed), evaluating after each; keep the best."""
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    params = list(model.named_parameters()) + list(extra_params or [])
    opt, sched = build_optimizer(params, cfg, total_steps)
    result = TrainResult(best_metric=-math.inf, best_epoch=-1)
    step, t0 = 0, time.perf_counter()
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(n_epochs):
        model.train()
        running: dict[str, torch.Tensor] = {}
        steps_this_epoch = min(steps_per_epoch, total_steps - step)
        with progress_bar(steps_this_epoch, f"{description} epoch {epoch + 1}/{n_epochs}", unit="step") as bar:
            for batch in epoch_batches(epoch):
                if step >= total_steps or bar.done >= steps_this_epoch:  # stop: max steps or a fractional epoch
                    break
                loss, parts = loss_fn(batch)  # forward + loss (the caller's single loss seam)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:  # clip
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                bar.advance(1)
                # log: the loss parts stay on the device and are summed there; the host syncs once per log line
                for k, v in parts.items():
                    running[k] = running[k] + v if k in running else v
                if cfg.logging_steps > 0 and step % cfg.logging_steps == 0:
                    avg = ", ".join(f"{k} {float(v) / cfg.logging_steps:.4f}" for k, v in running.items())
                    log(f"step {step}/{total_steps}  {avg}  lr {sched.get_last_lr()[0]:.2e}")
                    running = {}
        # eval / checkpoint: after every epoch, keep the best on the main dev metric
        metrics = evaluate()
        entry = {"epoch": epoch + 1, "step": step, **metrics}
        result.history.append(entry)
        score = metrics[main_metric]
        better = score > result.best_metric
        log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + ("  (best so far, saved)" if better else ""))
        if better:
            result.best_metric, result.best_epoch = score, epoch + 1
            save_best()
    result.steps, result.train_seconds = step, time.perf_counter() - t0
    return result


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
