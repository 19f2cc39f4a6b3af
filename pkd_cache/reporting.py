"""`--report-to`: the training curves (the loss and its parts, the learning rate, every dev score) sent where the
Trainer sends them. TensorBoard through `torch.utils.tensorboard`, event files in `<output_dir>/runs/`; wandb and
mlflow when they are installed (one line says so, and training goes on, when one asked for is not)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .progress import log

INTEGRATIONS = ("tensorboard", "wandb", "mlflow")


class Reporter:
    """`log(step, values)` to every integration asked for that is installed; `close()` at the end."""

    def __init__(self, names: Optional[list[str]], logdir: Path, run_name: str, config: dict):
        asked = list(INTEGRATIONS) if "all" in (names or []) else [n for n in names or [] if n != "none"]
        self.sinks: list[tuple[Callable[[int, dict], None], Callable[[], None]]] = []
        for name in asked:
            try:
                self.sinks.append(_OPEN[name](logdir, run_name, config))
            except ImportError:
                log(f"--report-to {name}: {name} is not installed here; not reporting to it")

    def log(self, step: int, values: dict) -> None:
        for write, _ in self.sinks:
            write(step, values)

    def close(self) -> None:
        for _, close in self.sinks:
            close()


def _tensorboard(logdir: Path, run_name: str, config: dict):
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    writer = SummaryWriter(log_dir=str(logdir / "runs"))
    writer.add_text("config", f"```\n{config}\n```")

    def write(step: int, values: dict) -> None:
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        writer.flush()

    return write, writer.close


def _wandb(logdir: Path, run_name: str, config: dict):
    import wandb

    run = wandb.init(project="pkd-cache", name=run_name, dir=str(logdir), config=config)
    return (lambda step, values: run.log(values, step=step)), run.finish


def _mlflow(logdir: Path, run_name: str, config: dict):
    import mlflow

    mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
    return (lambda step, values: mlflow.log_metrics(values, step=step)), mlflow.end_run


_OPEN = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}
