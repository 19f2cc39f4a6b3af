"""`--report-to`: the training curves (the loss and its parts, the learning rate, every dev score) sent where the
Trainer sends them. TensorBoard through `torch.utils.tensorboard`, event files in `<output_dir>/runs/`; wandb and
mlflow when they are installed (one line says so, and training goes on, when one asked for is not), set up by the
environment variables the Trainer's callbacks read. The metrics have the same names everywhere: `train/loss`,
`train/learning_rate`, `eval/validation_accuracy` ..."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import PkdCacheError
from .progress import log

INTEGRATIONS = ("tensorboard", "wandb", "mlflow")


class Reporter:
    """`log(step, values)` to every integration asked for that is installed; `close()` at the end, `close(failed=True)`
    when training raised (a run left open would swallow the next one's curves in this process: sweeps, tests)."""

    def __init__(self, names: Optional[list[str]], logdir: Path, run_name: str, config: dict):
        asked = list(INTEGRATIONS) if "all" in (names or []) else [n for n in names or [] if n != "none"]
        self.sinks: list[tuple[Callable[[int, dict], None], Callable[[bool], None]]] = []
        for name in asked:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:  # no origin: a folder of that name (wandb's own ./wandb/)
                log(f"--report-to {name}: {name} is not installed here; not reporting to it")
                continue
            try:
                self.sinks.append(_OPEN[name](logdir, run_name, config))
            except Exception as e:  # a tracking URI, store or login that does not work: one line, before training
                self.close(failed=True)
                raise PkdCacheError(f"--report-to {name}: could not start a run: {' '.join(str(e).split())}") from e

    def log(self, step: int, values: dict) -> None:
        for write, _ in self.sinks:
            write(step, values)

    def close(self, failed: bool = False) -> None:
        sinks, self.sinks = self.sinks, []  # once, even if a close raises
        for _, close in sinks:
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():  # the failure is the error
                close(failed)


def _tensorboard(logdir: Path, run_name: str, config: dict):
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    writer = SummaryWriter(log_dir=str(logdir / "runs"))
    writer.add_text("config", f"```\n{config}\n```")

    def write(step: int, values: dict) -> None:
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        writer.flush()

    return write, lambda failed: writer.close()


def _wandb(logdir: Path, run_name: str, config: dict):
    """As the Trainer's WandbCallback: project WANDB_PROJECT (its default, "huggingface"), the run named after the
    output folder. Its files go to the output folder unless WANDB_DIR says where; `create_new`: the students of one
    pass are runs side by side (wandb's default would hand the second student the first one's run)."""
    import wandb

    run = wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), name=run_name, config=config,
                     dir=os.getenv("WANDB_DIR") or str(logdir), reinit="create_new")
    return (lambda step, values: run.log(values, step=step)), lambda failed: run.finish(exit_code=int(failed))


def _mlflow(logdir: Path, run_name: str, config: dict):
    """As the Trainer's MLflowCallback: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (made if missing), the run named
    after the output folder, the config's values as params (cut to mlflow's length), metric names with a character
    mlflow refuses made `_`. Through a client, not mlflow's one active run: the students of one pass are runs side
    by side, and a failed run is ended here rather than left active to refuse the next."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    client = MlflowClient()
    name = os.getenv("MLFLOW_EXPERIMENT_NAME")
    found = client.get_experiment_by_name(name) if name else None
    experiment = found.experiment_id if found else client.create_experiment(name) if name else \
        os.getenv("MLFLOW_EXPERIMENT_ID", "0")  # "0": mlflow's Default
    run_id = client.create_run(experiment, run_name=run_name).info.run_id
    params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in _flat(config).items()]
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def write(step: int, values: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(re.sub(r"[^\w\-. :/]", "_", k), float(v), now, step)
                                          for k, v in values.items()])

    return write, lambda failed: client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def _flat(config: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 0}} -> {"train.seed": 0}: one mlflow param a setting."""
    flat: dict = {}
    for k, v in config.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


_OPEN = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}
