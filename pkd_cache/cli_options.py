"""The options several `pkd-cache` commands share (typer Option objects), and the small helpers that turn their
values into configs. One definition each, so a flag reads and means the same in every command."""
from __future__ import annotations

from typing import Optional

import typer

from .config import TrainConfig
from .errors import PkdCacheError


def _train_config(epochs, learning_rate, batch_size, weight_decay, warmup_ratio, seed, max_steps,
                  logging_steps, save_steps: int = 0, **more) -> TrainConfig:
    """`more`: the other TrainConfig fields a command takes (max_grad_norm, lr_scheduler_type, eval_strategy...)."""
    return TrainConfig(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, weight_decay=weight_decay,
                       warmup_ratio=warmup_ratio, seed=seed, max_steps=max_steps, logging_steps=logging_steps,
                       save_steps=save_steps, **more)


def _fail(message: str, code: int) -> None:
    """One line on stderr, and exit `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _in_cache(store: Optional[str], cache: Optional[str]) -> Optional[str]:
    """`--store` as given, or the store of the cache (`--cache`, else PKD_CACHE) that an id names."""
    if store is None:
        return None
    from .store.cache import resolve_store

    return resolve_store(store, cache)


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise PkdCacheError(f"{flag} takes comma-separated layer numbers like 2,4; got {text!r}") from None


Epochs = typer.Option(4.0, "--epochs", "--num-train-epochs", help="Training epochs (paper: 4).")
Lr = typer.Option(2e-5, "--learning-rate", help="Peak learning rate of AdamW (paper: 2e-5).")
Wd = typer.Option(0.01, "--weight-decay", help="AdamW's decoupled weight decay (not on biases and LayerNorm).")
Warmup = typer.Option(0.1, "--warmup-ratio", help="Fraction of steps of linear warm-up.")
Seed = typer.Option(0, "--seed", help="Random seed (batch order, dropout, the student's new head).")
CacheOpt = typer.Option(None, "--cache", envvar="PKD_CACHE", show_envvar=True,
                        help="The team cache, a folder or bucket: dump puts a store there when no --out is given, "
                             "and a store's id names it wherever a store is taken.")
MaxSteps = typer.Option(-1, "--max-steps", help="Stop after this many optimiser steps (> 0).")
LogSteps = typer.Option(50, "--logging-steps", help="Log the loss every N optimiser steps (0: never).")
DataDir = typer.Option(None, "--data-dir", help="Local folder of task files (GLUE TSV, CSV, JSONL, Parquet); "
                                                "default: the Hugging Face hub.")

TASK_NAMES = "sst2, cola, mrpc, qqp, mnli, qnli, rte, stsb"  # data/tasks.py (a test keeps the two the same)
Task = typer.Option(..., "--task", "--task-name", help=f"The GLUE task: {TASK_NAMES}; or lm (dump: a causal LM "
                                                        f"over --data-files).")
TaskCheck = typer.Option(None, "--task", "--task-name", help=f"Optional check: the task the store must hold "
                                                              f"({TASK_NAMES}).")
StudentLayers = typer.Option(3, "--student-layers", help="k: the student's layers (the first k of --student-init).")
Strategy = typer.Option("skip", "--strategy", help="PKD-skip or PKD-last layer map.")
Alpha = typer.Option(0.5, "--alpha", help="Weight of the soft-label loss.")
Beta = typer.Option(None, "--beta", help="Weight of the patient loss, summed over the hidden dim (default: 100/H, "
                                         "the paper's 100 in its code's units).")
Temperature = typer.Option(None, "--temperature", help="Softmax temperature of the KD loss (default 10; a token "
                                                       "store's: the temperature its targets were dumped at).")
StudentInit = typer.Option(None, "--student-init", help="Pretrained model to take the first k layers from "
                                                        "(default: the teacher's base model).")
BatchSize = typer.Option(None, "--batch-size", help="The global batch: examples per optimiser step over all ranks "
                                                    "(default 32, the paper's; or per-device x ranks x accumulation "
                                                    "steps when those are given).")
PerDevice = typer.Option(None, "--per-device-train-batch-size", "--per_device_train_batch_size",
                         "--per-device-batch-size", help="Examples per forward on each device, as in run_glue.py: the "
                                                         "global batch is this x ranks x accumulation steps.")
Accumulation = typer.Option(None, "--gradient-accumulation-steps", "--gradient_accumulation_steps",
                            help="Forwards per optimiser step on each device (default 1, or what --batch-size "
                                 "implies).")
Device = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: cuda if there is one).")


AllowNoChecksums = typer.Option(False, "--allow-no-checksums",
                                help="Read a store that has no checksum manifest (pkd-cache 0.1.0 wrote such stores): "
                                     "its chunks are decoded and their values checked, but not compared with "
                                     "dump-time checksums, so corruption that still decodes goes unseen.")
MaxGradNorm = typer.Option(1.0, "--max-grad-norm", help="Clip the gradient norm to this (0: no clipping).")
Scheduler = typer.Option("linear", "--lr-scheduler-type", help="After the warm-up: linear (to 0), cosine (to 0) or "
                                                                "constant_with_warmup.")
EvalStrategy = typer.Option("epoch", "--eval-strategy", "--evaluation-strategy",
                            help="When the dev sets are scored and the best checkpoint kept: epoch, steps (every "
                                 "--eval-steps) or no (once, at the end).")
EvalSteps = typer.Option(None, "--eval-steps", help="With --eval-strategy steps: score every N optimiser steps "
                                                    "(default: --logging-steps), and after the last.")
BestMetric = typer.Option(None, "--metric-for-best-model", help="The dev metric the best checkpoint is kept by: "
                                                                "accuracy, f1, matthews_correlation, pearson, or one "
                                                                "split's (validation_matched_accuracy). Default: the "
                                                                "task's main metric.")
EvalBatch = typer.Option(128, "--per-device-eval-batch-size", help="Examples per forward when scoring the dev sets.")
Workers = typer.Option(None, "--dataloader-num-workers", help="Threads that read and decompress store chunks ahead "
                                                              "(default: up to 4; 0: none, read in the training "
                                                              "loop).")
Fp16 = typer.Option(False, "--fp16", help="Train the student under float16 autocast with loss scaling (CUDA).")
Bf16 = typer.Option(False, "--bf16", help="Train the student under bfloat16 autocast (CUDA, or CPU).")
OutputDir = typer.Option(..., "--output-dir", help="Folder to write the model into (written aside, then put in place).")
Overwrite = typer.Option(False, "--overwrite", "--overwrite-output-dir",
                         help="Replace an output pkd-cache wrote before (never anything else).")
MaxSeqLength = typer.Option(128, "--max-seq-length", help="Tokens per example after truncation.")
ReportTo = typer.Option(None, "--report-to", help="Send the training curves to tensorboard (event files in "
                                                   "<output-dir>/runs), wandb or mlflow (when installed), all, or "
                                                   "none; repeatable or comma-separated.")


def _names(values: Optional[list[str]]) -> Optional[list[str]]:
    """`--report-to a,b --report-to c` -> [a, b, c]."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()] if values else None
DoPredict = typer.Option(False, "--do-predict", help="After training, write the best student's predictions on the "
                                                       "test split(s) (predict_results_<task>.txt, as run_glue.py; "
                                                       "local files from --data-dir, else the hub).")
SaveTotalLimit = typer.Option(None, "--save-total-limit", help="Also keep each checkpoint saved (every --save-steps "
                                                               "and epoch) as checkpoint-<step>/, at most N of them.")
