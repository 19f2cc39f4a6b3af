"""`pkd-cache` command line: finetune, dump, distill, sweep, eval, info, verify, ls, serve; each calls the API."""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import List, Optional

import typer

from .config import DistillConfig, DumpConfig, EvalConfig, FinetuneConfig, TrainConfig
from .errors import Interrupted, PkdCacheError
from . import cli_store
from .cli_options import (TASK_NAMES, Accumulation, AllowNoChecksums, Alpha, BatchSize, BestMetric, Beta, Bf16,
                          CacheOpt, DataDir, Device, DoPredict, Epochs, EvalBatch, EvalSteps, EvalStrategy, Fp16,
                          LogSteps, Lr, MaxGradNorm, MaxSeqLength, MaxSteps, OutputDir, Overwrite, PerDevice, ReportTo,
                          SaveTotalLimit, Scheduler, Seed, Strategy, StudentInit, StudentLayers, Task, TaskCheck,
                          Temperature, Warmup, Wd, Workers, _fail, _in_cache, _int_list, _names, _train_config)

def _dashes(token: str) -> str:
    """`--num_train_epochs` is `--num-train-epochs`: option names take run_glue.py's underscores too (click hands
    this the name without its dashes, and a command's name, which take them the same way)."""
    return token.replace("_", "-")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"token_normalize_func": _dashes},
                  help="Patient Knowledge Distillation with a cached teacher: dump once, distill many students.")


def _env_debug() -> bool:
    return os.environ.get("PKD_CACHE_DEBUG", "") not in ("", "0")


_state = {"debug": _env_debug()}


def user_errors(fn):
    """One line and a non-zero exit for bad input; a bug says so (with --debug, the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except PkdCacheError as e:
            if _state["debug"]:
                raise
            _fail(str(e), 130 if isinstance(e, Interrupted) else 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as e:  # disk full, permissions, ...: the system's own words, and where
            if _state["debug"]:
                raise
            where = f": {e.filename}" if e.filename else ""
            _fail(f"{e.strerror or e}{where}", 2)
        except Exception as e:  # a bug in pkd-cache: still one line, and how to get the details
            if _state["debug"]:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            _fail(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (or set PKD_CACHE_DEBUG=1).")):
    _state["debug"] = debug or _env_debug()  # per invocation: an in-process caller may run several commands
    from .progress import log_to_stderr

    log_to_stderr()  # a command's progress lines go to stderr, whatever the root logger says


def _run(api: str, config):
    """`pkd_cache.<api>(config)`, the config checked first: a bad value is refused before the API's modules bring
    in torch and transformers (seconds)."""
    config.check()
    return getattr(sys.modules[__package__], api)(config)  # the package's lazy attribute imports it




@app.command()
@user_errors
def finetune(model: str = typer.Option(..., "--model", "--model-name-or-path", help="Hub name, alias or folder."),
             task: str = Task,
             output_dir: str = OutputDir,
             data_dir: Optional[str] = DataDir,
             max_seq_length: int = MaxSeqLength,
             batch_size: int = typer.Option(32, "--batch-size", "--per-device-train-batch-size",
                                            "--per_device_train_batch_size",
                                            help="Examples per step (finetune runs as one process: per device)."),
             epochs: float = Epochs, learning_rate: float = Lr, weight_decay: float = Wd,
             warmup_ratio: float = Warmup, seed: int = Seed, max_steps: int = MaxSteps, logging_steps: int = LogSteps,
             overwrite: bool = Overwrite,
             max_train_samples: Optional[int] = typer.Option(None, "--max-train-samples", "--max-examples",
                                                             help="Only the first N train examples (smoke runs)."),
             max_eval_samples: Optional[int] = typer.Option(None, "--max-eval-samples",
                                                            help="Only the first N dev examples."),
             max_grad_norm: float = MaxGradNorm, lr_scheduler_type: str = Scheduler,
             eval_strategy: str = EvalStrategy, eval_steps: Optional[int] = EvalSteps,
             metric_for_best_model: Optional[str] = BestMetric):
    """Fine-tune a teacher on a task (AdamW, linear decay, keep the best dev checkpoint)."""
    _run("finetune", FinetuneConfig(model=model, task=task, output_dir=output_dir, data_dir=data_dir,
                                    max_seq_length=max_seq_length, overwrite=overwrite,
                                    max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                                    train=_train_config(epochs, learning_rate, batch_size, weight_decay,
                                                        warmup_ratio, seed, max_steps, logging_steps,
                                                        max_grad_norm=max_grad_norm,
                                                        lr_scheduler_type=lr_scheduler_type,
                                                        eval_strategy=eval_strategy, eval_steps=eval_steps,
                                                        metric_for_best_model=metric_for_best_model)))


@app.command()
@user_errors
def dump(teacher: str = typer.Option(..., "--teacher", help="Fine-tuned teacher: folder, hub name, or "
                                                            "bert-base / bert-large (fine-tuned first)."),
         task: str = Task,
         out: Optional[str] = typer.Option(None, "--out", help="Store to write: a folder or an fsspec URL (s3://, "
                                                              "gs://, memory://). Default: its place in the cache."),
         data_dir: Optional[str] = DataDir,
         split: Optional[List[str]] = typer.Option(None, "--split", help="Splits to dump (repeatable); default all."),
         max_seq_length: int = MaxSeqLength,
         batch_size: int = typer.Option(64, "--batch-size", help="Examples per teacher forward."),
         dtype: str = typer.Option("float16", "--dtype", "--hidden-dtype",
                                   help="Storage dtype of the CLS vectors (--task lm: of the hidden states)."),
         chunk_size: int = typer.Option(1024, "--chunk-size", help="Examples per chunk."),
         sort_window: int = typer.Option(8192, "--sort-window", help="Examples sorted by length together (whole "
                                                                      "chunks) so batches carry little padding."),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace the store at --out (only a store)."),
         finetune: bool = typer.Option(True, "--finetune/--no-finetune",
                                       help="Fine-tune a teacher whose head is untrained (else refuse)."),
         finetune_epochs: float = typer.Option(4.0, "--finetune-epochs", help="Epochs of the teacher's fine-tune "
                                                                              "(when it has no task head)."),
         finetune_learning_rate: float = typer.Option(2e-5, "--finetune-learning-rate",
                                                      help="Learning rate of that fine-tune."),
         seed: int = Seed,
         device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if any)."),
         precision: str = typer.Option("fp32", "--precision", help="Teacher forward in fp32, fp16 or bf16 (autocast)."),
         pad_to_max_length: bool = typer.Option(False, "--pad-to-max-length",
                                                help="Pad every batch to --max-seq-length (as the original PKD code) "
                                                     "instead of length bucketing."),
         max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Only the first N of each split."),
         store_format: str = typer.Option("zarr", "--format", help="zarr, or arrow (IPC shards that "
                                                                   "`datasets.load_dataset('arrow', ...)` reads)."),
         resume: bool = typer.Option(False, "--resume", help="Continue an interrupted dump into --out: keep its "
                                                             "durable chunks, run the teacher on the rest."),
         cache: Optional[str] = CacheOpt,
         wait: bool = typer.Option(True, "--wait/--no-wait", help="In the cache: wait for another dump writing "
                                                                   "the same store, or refuse at once."),
         add_split: Optional[List[str]] = typer.Option(None, "--add-split", help="Extend the complete store at --out "
                                                       "(or this dump's store in the cache) with this split, with "
                                                       "the store's teacher and settings (repeatable)."),
         data_files: Optional[List[str]] = typer.Option(None, "--data-files", help="--task lm: the corpus (txt, "
                                                        "jsonl, parquet or a hub dataset); repeatable."),
         validation_file: Optional[List[str]] = typer.Option(None, "--validation-file", help="--task lm: a held-out "
                                                             "corpus, stored as split validation; repeatable."),
         text_column: str = typer.Option("text", "--text-column", help="--task lm: the jsonl field or parquet column "
                                                                        "holding each document."),
         logits: str = typer.Option("sample:64", "--logits", help="--task lm: the teacher's next-token "
                                    "distribution as sample:N (RS-KD draws), topk:K, or none."),
         hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="--task lm: teacher layers whose "
                                                     "per-token hidden states are stored, e.g. 4,8 (0 = embeddings); "
                                                     "stored as --dtype."),
         sequence_mode: str = typer.Option("pack", "--sequence-mode", help="--task lm: pack documents into "
                                           "--max-seq-length sequences (run_clm), cut each document to it, or none "
                                           "(refuse longer ones)."),
         sample_seed: int = typer.Option(0, "--sample-seed", help="--task lm: the seed of sample:N's draws (part "
                                                                   "of the cache key)."),
         temperature: float = typer.Option(1.0, "--temperature", help="--task lm: the teacher's softmax "
                                                                      "temperature of the stored targets."),
         chunk_tokens: int = typer.Option(4096, "--chunk-tokens", help="--task lm: tokens per chunk of the store.")):
    """Run the teacher once; write token ids, labels, logits and every layer's [CLS] to a store (--task lm: a
    causal LM's per-token sparse logits and hidden states over a corpus)."""
    _run("dump", DumpConfig(teacher=teacher, task=task, out=out, data_dir=data_dir, splits=split or None,
                            max_seq_length=max_seq_length, batch_size=batch_size, dtype=dtype, chunk_size=chunk_size,
                            sort_window=sort_window, overwrite=overwrite, finetune=finetune, device=device,
                            max_examples=max_examples, precision=precision, pad_to_max_length=pad_to_max_length,
                            format=store_format, resume=resume, cache=cache, wait=wait, add_splits=add_split or None,
                            finetune_train=TrainConfig(epochs=finetune_epochs, learning_rate=finetune_learning_rate,
                                                       seed=seed),
                            data_files=data_files or None, validation_files=validation_file or None,
                            text_column=text_column, logits=logits,
                            hidden_layers=_int_list(hidden_layers, "--hidden-layers"), sequence_mode=sequence_mode,
                            sample_seed=sample_seed, temperature=temperature, chunk_tokens=chunk_tokens))


@app.command()
@user_errors
def distill(store: Optional[str] = typer.Option(None, "--store", help="Path or URL of a store."),
            output_dir: str = OutputDir,
            task: Optional[str] = TaskCheck, student_layers: int = StudentLayers, strategy: str = Strategy,
            layer_map: Optional[str] = typer.Option(None, "--layer-map", help="Teacher layers, e.g. 2,4."),
            alpha: float = Alpha, beta: Optional[float] = Beta, temperature: float = Temperature,
            student_init: Optional[str] = StudentInit, batch_size: Optional[int] = BatchSize,
            per_device_train_batch_size: Optional[int] = PerDevice,
            gradient_accumulation_steps: Optional[int] = Accumulation, epochs: float = Epochs,
            learning_rate: float = Lr, weight_decay: float = Wd,
            warmup_ratio: float = Warmup, seed: int = Seed, max_steps: int = MaxSteps, logging_steps: int = LogSteps,
            overwrite: bool = Overwrite,
            device: Optional[str] = Device,
            teacher: Optional[str] = typer.Option(None, "--teacher", help="Online KD instead of a store: run this "
                                                                          "fine-tuned teacher on every step."),
            data_dir: Optional[str] = DataDir,
            max_seq_length: int = typer.Option(128, "--max-seq-length", help="Online KD: tokenisation length."),
            chunk_size: int = typer.Option(1024, "--chunk-size", help="Online KD: batch order of a store with "
                                                                      "this chunk size."),
            max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Online KD: first N examples."),
            save_steps: int = typer.Option(0, "--save-steps", help="Also checkpoint every N steps (always after "
                                                                   "each epoch)."),
            resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --output-dir."),
            max_grad_norm: float = MaxGradNorm, lr_scheduler_type: str = Scheduler,
            eval_strategy: str = EvalStrategy, eval_steps: Optional[int] = EvalSteps,
            metric_for_best_model: Optional[str] = BestMetric, per_device_eval_batch_size: int = EvalBatch,
            dataloader_num_workers: Optional[int] = Workers, fp16: bool = Fp16, bf16: bool = Bf16,
            report_to: Optional[List[str]] = ReportTo, do_predict: bool = DoPredict,
            save_total_limit: Optional[int] = SaveTotalLimit,
            allow_no_checksums: bool = AllowNoChecksums, cache: Optional[str] = CacheOpt,
            max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Token store: real tokens per "
                                                     "forward (default: the per-device batch x the store's max "
                                                     "length).")):
    """Train a k-layer student from a store (no teacher in memory); keep the best dev checkpoint.

    With --teacher instead of --store: online KD, the same losses with the teacher run on every step (to compare
    with the cached teacher on the same student, seed and batches).
    """
    _run("distill", DistillConfig(store=_in_cache(store, cache), output_dir=output_dir, task=task,
                                  student_layers=student_layers,
                                  strategy=strategy, layer_map=_int_list(layer_map, "--layer-map"), alpha=alpha,
                                  beta=beta, temperature=temperature, student_init=student_init, overwrite=overwrite,
                                  device=device, teacher=teacher, data_dir=data_dir, max_seq_length=max_seq_length,
                                  chunk_size=chunk_size, max_examples=max_examples, resume=resume,
                                  per_device_train_batch_size=per_device_train_batch_size,
                                  gradient_accumulation_steps=gradient_accumulation_steps,
                                  per_device_eval_batch_size=per_device_eval_batch_size,
                                  dataloader_num_workers=dataloader_num_workers, fp16=fp16, bf16=bf16,
                                  report_to=_names(report_to), do_predict=do_predict,
                                  allow_no_checksums=allow_no_checksums, max_tokens=max_tokens,
                                  train=_train_config(epochs, learning_rate, batch_size, weight_decay, warmup_ratio,
                                                      seed, max_steps, logging_steps, save_steps,
                                                      max_grad_norm=max_grad_norm, lr_scheduler_type=lr_scheduler_type,
                                                      eval_strategy=eval_strategy, eval_steps=eval_steps,
                                                      metric_for_best_model=metric_for_best_model,
                                                      save_total_limit=save_total_limit)))


@app.command()
@user_errors
def sweep(store: Optional[str] = typer.Option(None, "--store", help="Path or URL of a store."),
          output_dir: Optional[str] = typer.Option(None, "--output-dir",
                                                   help="Folder of the runs, results.csv and sweep.png."),
          grid: List[str] = typer.Option([], "--grid", help="NAME=V1,V2,... (repeatable): alpha, beta, paper_beta, "
                                                            "temperature, learning_rate, student_layers, strategy, "
                                                            "epochs, batch_size, seed, weight_decay, warmup_ratio."),
          students_per_pass: int = typer.Option(1, "--students-per-pass", help="Students trained together on each "
                                                                               "batch read from the store."),
          top: int = typer.Option(10, "--top", help="Rows of the table of best runs."),
          shard: str = typer.Option("0/1", "--shard", help="I/N: train only the I-th of N disjoint parts of the "
                                                           "grid (0-based; e.g. $SLURM_ARRAY_TASK_ID/8)."),
          collect: Optional[str] = typer.Option(None, "--collect", help="DIR: merge the results of every shard of "
                                                                        "the sweep in DIR; trains nothing."),
          task: Optional[str] = TaskCheck, student_layers: int = StudentLayers, strategy: str = Strategy,
          alpha: float = Alpha, beta: Optional[float] = Beta, temperature: float = Temperature,
          student_init: Optional[str] = StudentInit, batch_size: Optional[int] = BatchSize,
          per_device_train_batch_size: Optional[int] = PerDevice,
          gradient_accumulation_steps: Optional[int] = Accumulation, epochs: float = Epochs,
          learning_rate: float = Lr, weight_decay: float = Wd,
          warmup_ratio: float = Warmup, seed: int = Seed, max_steps: int = MaxSteps,
          logging_steps: int = typer.Option(0, "--logging-steps", help="Log each run's loss every N steps (0: never)."),
          device: Optional[str] = Device, max_grad_norm: float = MaxGradNorm, lr_scheduler_type: str = Scheduler,
          eval_strategy: str = EvalStrategy, eval_steps: Optional[int] = EvalSteps,
          metric_for_best_model: Optional[str] = BestMetric, per_device_eval_batch_size: int = EvalBatch,
          dataloader_num_workers: Optional[int] = Workers, fp16: bool = Fp16, bf16: bool = Bf16,
          allow_no_checksums: bool = AllowNoChecksums, cache: Optional[str] = CacheOpt):
    """Train every combination of a grid of student settings from one store (resumable); report the best.

    Settings not in a grid take the value of their option. `paper_beta` is beta in the PKD paper's units (mean over
    the hidden dimension): the paper's grid is `--grid paper_beta=10,100,500,1000`. On a cluster, N jobs with
    `--shard 0/N` ... `--shard N-1/N` split the grid over one shared runs folder; `--collect DIR` merges them.
    """
    from .commands.sweep import SweepConfig, parse_grid, parse_shard
    from .commands.sweep import collect as collect_runs
    from .commands.sweep import sweep as run

    if collect is not None:
        collect_runs(collect, top)
        return
    if store is None or output_dir is None:
        raise PkdCacheError("sweep needs --store and --output-dir (or --collect DIR to merge a sweep's results)")
    base = DistillConfig(store=_in_cache(store, cache), output_dir=output_dir, task=task,
                         student_layers=student_layers,
                         strategy=strategy, alpha=alpha, beta=beta, temperature=temperature,
                         student_init=student_init, device=device, allow_no_checksums=allow_no_checksums,
                         per_device_train_batch_size=per_device_train_batch_size,
                         gradient_accumulation_steps=gradient_accumulation_steps,
                         per_device_eval_batch_size=per_device_eval_batch_size,
                         dataloader_num_workers=dataloader_num_workers, fp16=fp16, bf16=bf16,
                         train=_train_config(epochs, learning_rate, batch_size, weight_decay, warmup_ratio, seed,
                                             max_steps, logging_steps, max_grad_norm=max_grad_norm,
                                             lr_scheduler_type=lr_scheduler_type, eval_strategy=eval_strategy,
                                             eval_steps=eval_steps, metric_for_best_model=metric_for_best_model))
    run(SweepConfig(base=base, grid=parse_grid(grid), students_per_pass=students_per_pass, top=top,
                    shard=parse_shard(shard)))


@app.command("bench-student")
@user_errors
def bench_student(model: str = typer.Option(..., "--model", help="The student (a saved folder)."),
                  teacher: Optional[str] = typer.Option(None, "--teacher", help="The teacher to compare with."),
                  batch_size: int = typer.Option(32, "--batch-size", help="Examples per forward, for throughput."),
                  seq_length: int = typer.Option(128, "--seq-length", help="Tokens per example."),
                  iterations: int = typer.Option(20, "--iterations", help="Timed forwards per measure."),
                  device: Optional[str] = Device,
                  as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")):
    """Parameters, latency and throughput of a student next to its teacher (the PKD paper's Table 2)."""
    from .commands.bench_student import BenchStudentConfig, print_rows
    from .commands.bench_student import bench_student as run

    cfg = BenchStudentConfig(model=model, teacher=teacher, batch_size=batch_size, seq_length=seq_length,
                             iterations=iterations, device=device)
    rows = run(cfg)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        print_rows(rows, cfg)


@app.command("eval")
@user_errors
def eval_(model: str = typer.Option(..., "--model", "--model-name-or-path", help="A saved model folder or hub "
                                                                                   "name."),
          task: str = typer.Option(..., "--task", "--task-name", help=f"The GLUE task ({TASK_NAMES}), or lm: a "
                                                                     f"causal LM's perplexity on --data-files."),
          data_dir: Optional[str] = DataDir,
          max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length",
                                                       help="Default: the length the model was trained at (lm: its "
                                                            "context, at most 1024)."),
          batch_size: int = typer.Option(64, "--batch-size", help="Examples per forward."),
          max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Only the first N dev examples."),
          device: Optional[str] = Device,
          data_files: Optional[list[str]] = typer.Option(None, "--data-files", help="--task lm: the held-out "
                                                         "corpus (txt, jsonl, parquet or a hub dataset); repeatable."),
          text_column: str = typer.Option("text", "--text-column", help="--task lm: the jsonl field or parquet "
                                                                         "column holding each document."),
          as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON.")):
    """Score a saved model on the task's dev split(s), or a causal LM's perplexity on --data-files (--task lm): a
    table (or --json); saved as eval_results.json beside a model pkd-cache wrote."""
    metrics = _run("evaluate", EvalConfig(model=model, task=task, data_dir=data_dir, max_seq_length=max_seq_length,
                                          batch_size=batch_size, max_examples=max_examples, device=device,
                                          data_files=data_files, text_column=text_column))
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "score", title=f"{model} on {task}")
    for k, v in metrics.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) else f"{v:.4f}")
    Console().print(table)


# the commands that look at stores rather than train (cli_store.py), each a plain function registered here
for _name, _fn in (("verify", cli_store.verify), ("info", cli_store.info), ("ls", cli_store.ls), ("gc", cli_store.gc),
                   ("serve", cli_store.serve)):
    app.command(_name)(user_errors(_fn))


def _usage_errors() -> tuple[type, type]:
    """(UsageError, NoArgsIsHelpError) of the click that typer uses (typer >= 0.20 vendors its own)."""
    try:
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import UsageError

        NoArgsIsHelpError = getattr(__import__("click.exceptions").exceptions, "NoArgsIsHelpError", UsageError)
    return UsageError, NoArgsIsHelpError


def main() -> None:
    """The console script. A mistyped flag or value (click's usage errors) is one `error:` line too, like every
    other bad input, instead of a usage box."""
    usage_error, no_args = _usage_errors()
    try:
        code = app(standalone_mode=False)
    except no_args:
        app()  # `pkd-cache` alone: the help, as click prints it
        return
    except usage_error as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        typer.echo(f"error: {' '.join(e.format_message().split()).rstrip('.')}{where}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
