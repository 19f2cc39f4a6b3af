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

from .. import checkpoint
from ..config import DistillConfig, resolve_batch, to_dict
from ..data.loading import find_split_file, test_splits
from ..data.tasks import get_task
from ..distributed import dist_context, process_group
from ..errors import PkdCacheError
from ..progress import quiet
from ..sources import BatchSource, open_source
from ..store.cache import resolve_store
from ..store.format import StoreMeta
from ..student.layer_map import layer_map
from ..training import resolve_device, train_many
from .evaluate import main_metric_key
from .output_lock import OutputLock
from .pass_student import PassBatches, PassStudent
from .paths import check_inputs, check_output_dir, model_inputs, resume_dir

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
        students = [PassStudent(p, source, layers, len(plans) > 1, dist) for p in plans]
        for s in students:
            s.hint = hint and len(plans) == 1  # a `next:` line after a lone student (sweep reports its own way)
            s.pass_students = len(plans)  # the students sharing this pass's wall time
        metrics = _train_pass(students, PassBatches(source, configs[0], layers, dist), description, resume)
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
        device = resolve_device(configs[0].device)
        source, world = open_source(configs[0], device), dist_context(device).world
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


def _train_pass(students: list[PassStudent], batches: PassBatches, description: str, resume: bool) -> list[dict]:
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
