"""`pkd-cache sweep`: every combination of a grid of student settings, trained from one store, resumable.

    pkd-cache sweep --store sst2.zarr --student-init P --grid 'alpha=0.2,0.5,0.7' --grid 'paper_beta=0,10,100,500' \
        --grid 'temperature=5,10,20' --output-dir runs/

Each combination is a `distill` run in `<output-dir>/<name>/` (name = its grid values, written so that two
different values never share a name: `alpha=0.1` and `alpha=0.1000001`). A run whose folder already
holds a `metrics.json` with the same settings is skipped, so an interrupted sweep resumes where it stopped. Runs
that share the batches (store, batch size, seed, epochs) are trained `students_per_pass` at a time in one pass over
the store (`distill_many`). After each pass, `results.csv`, the table of the best runs and `sweep.png` are
rewritten from the runs' metrics (sweep_report.py).

On a cluster: `--shard I/N` trains only the runs whose index in the grid is I modulo N (0 <= I < N), so N jobs of
a SLURM array (or N machines) split one sweep over one shared store and one shared runs folder; every shard
writes the same `sweep.json`, and `pkd-cache sweep --collect DIR` re-plans the grid from it, then rewrites the
results table and plot from every finished run and names the runs still missing.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DistillConfig, TrainConfig, to_dict
from ..errors import PkdCacheError
from .paths import KIND_NAMES, check_inputs, entries, mark_folder, model_inputs, output_kind
from ..progress import log

# grid key -> (where it lives, how its values parse)
GRID_KEYS: dict[str, tuple[str, type]] = {
    "alpha": ("distill", float), "beta": ("distill", float), "paper_beta": ("distill", float),
    "temperature": ("distill", float), "student_layers": ("distill", int), "strategy": ("distill", str),
    "learning_rate": ("train", float), "epochs": ("train", float), "batch_size": ("train", int),
    "seed": ("train", int), "weight_decay": ("train", float), "warmup_ratio": ("train", float),
}


@dataclass
class SweepConfig:
    """A grid over `base` (a DistillConfig whose `output_dir` is the sweep's folder)."""

    base: DistillConfig
    grid: dict[str, list] = field(default_factory=dict)
    students_per_pass: int = 1
    top: int = 10
    shard: tuple[int, int] = (0, 1)  # (I, N): train the runs whose grid index is I modulo N

    def check(self) -> None:
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise PkdCacheError(f"--shard {i}/{n}: expected I/N with 0 <= I < N")
        if self.students_per_pass < 1:
            raise PkdCacheError(f"--students-per-pass must be >= 1, got {self.students_per_pass}")
        if "beta" in self.grid and "paper_beta" in self.grid:
            raise PkdCacheError("sweep either beta or paper_beta, not both")
        for key, values in self.grid.items():
            if key not in GRID_KEYS:
                raise PkdCacheError(f"--grid {key}: unknown setting; known: {', '.join(GRID_KEYS)}")
            if not values:
                raise PkdCacheError(f"--grid {key}: no values")


def parse_grid(specs: list[str]) -> dict[str, list]:
    """['alpha=0.2,0.5', 'strategy=skip,last'] -> {'alpha': [0.2, 0.5], 'strategy': ['skip', 'last']}."""
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise PkdCacheError(f"--grid {spec!r}: expected NAME=V1,V2,...")
        if key not in GRID_KEYS:
            raise PkdCacheError(f"--grid {spec!r}: unknown setting {key!r}; known: {', '.join(GRID_KEYS)}")
        if key in grid:
            raise PkdCacheError(f"--grid {key} is given twice")
        kind = GRID_KEYS[key][1]
        parsed = []
        for v in (v.strip() for v in values.split(",")):
            if not v:
                continue
            try:
                parsed.append(kind(v))
            except ValueError:
                raise PkdCacheError(f"--grid {key}: {v!r} is not a {kind.__name__}") from None
        if not parsed:
            raise PkdCacheError(f"--grid {spec!r}: no values")
        unique: dict[str, Any] = {}
        for v in parsed:  # drop repeats (by name, so nan,nan is one value), keep order
            unique.setdefault(value_name(v), v)
        grid[key] = list(unique.values())
    return grid


@dataclass
class Run:
    name: str
    values: dict[str, Any]  # the grid values of this run
    config: DistillConfig


def plan_runs(sweep: SweepConfig, hidden_size: int) -> list[Run]:
    """Every combination, as a DistillConfig in its own folder (paper_beta converted with the teacher's width)."""
    keys = list(sweep.grid)
    runs = []
    for combo in itertools.product(*(sweep.grid[k] for k in keys)) if keys else [()]:
        values = dict(zip(keys, combo))
        cfg = copy.deepcopy(sweep.base)
        for k, v in values.items():
            if k == "paper_beta":  # the paper's units: mean over the hidden dimension
                cfg.beta = v / hidden_size
            elif GRID_KEYS[k][0] == "train":
                setattr(cfg.train, k, v)
            else:
                setattr(cfg, k, v)
        name = "_".join(f"{k}={value_name(v)}" for k, v in values.items()) or "run"
        # the sweep owns its run folders (finished ones are skipped before this matters); --overwrite only ever
        # replaces a student folder pkd-cache wrote there (paths.py), never anything else
        cfg.overwrite = True
        cfg.check()  # a bad value fails the sweep before anything trains
        runs.append(Run(name, values, cfg))
    for run, name in list(zip(runs, [_unique(r, runs) for r in runs])):
        run.name = name
        run.config.output_dir = str(Path(sweep.base.output_dir) / run.name)
    return runs


SAFE = re.compile(r"[A-Za-z0-9.+-]+")


def value_name(v) -> str:
    """A grid value as it appears in a run name; different values never read the same (the name is a folder)."""
    if isinstance(v, float):
        short = f"{v:g}"  # 0.5, 1e-05, 5: as the value was typed, when that is exact
        return short if float(short) == v else repr(v)  # else every digit: 0.1000001
    text = str(v)
    if SAFE.fullmatch(text) and not text.startswith("~"):
        return text
    return "~" + hashlib.sha256(text.encode()).hexdigest()[:12]  # not a safe folder name: its hash


MAX_NAME = 120  # well under any filesystem's limit on one name


def _unique(run: Run, runs: list[Run]) -> str:
    """The run's folder name: its values, with a hash of them where the name would be too long, or would equal
    another run's on a case-insensitive filesystem (never with the values above; a safety net)."""
    name = run.name
    digest = hashlib.sha256(json.dumps(run.values, sort_keys=True, default=repr).encode()).hexdigest()[:12]
    if len(name) > MAX_NAME:
        return f"{name[:MAX_NAME - 13]}_{digest}"
    if sum(r.name.casefold() == name.casefold() for r in runs) > 1:
        return f"{name}_{digest}"
    return name


def is_done(run: Run) -> bool:
    """A finished run with the same settings (metrics.json is written last, after the best checkpoint)."""
    path = Path(run.config.output_dir) / "metrics.json"
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text()).get("config", {})
    except ValueError:
        return False
    return _comparable(recorded) == _comparable(to_dict(run.config))


def _comparable(cfg: dict) -> dict:
    """The settings that make a run what it is (how it read its store, e.g. allow_no_checksums, does not)."""
    return {k: v for k, v in cfg.items() if k not in ("overwrite", "output_dir", "allow_no_checksums")}


def parse_shard(spec: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): the third of 8 shards (0-based, as SLURM_ARRAY_TASK_ID with --array=0-7)."""
    i, sep, n = spec.partition("/")
    try:
        shard = int(i), int(n)
    except ValueError:
        shard = None
    if not sep or shard is None or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise PkdCacheError(f"--shard {spec!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return shard


def shard_of(index: int, shards: int) -> int:
    return index % shards


def sweep(config: SweepConfig) -> list[dict]:
    """Run (or resume) the grid, or this shard's part of it; returns one result row per finished run of the whole
    grid (see sweep_report.result_rows)."""
    config.check()  # before the imports below bring in torch (seconds): a bad value is refused at once
    config.base.check()
    from .distill import check_runs, distill_many, pass_settings
    from ..store.reader import open_store
    from .sweep_report import write_report

    store = open_store(config.base.store, allow_no_checksums=config.base.allow_no_checksums)
    config.base = dataclasses.replace(config.base, store=store.path)  # an id in the cache, resolved
    runs = plan_runs(config, store.hidden_size)
    out = Path(config.base.output_dir).expanduser()
    teacher = store.meta.teacher
    _check_folder(out, config.base.output_dir, model_inputs(
        config.base.store, teacher, ("--student-init", config.base.student_init or teacher.base_model)))
    i, n = config.shard
    mine = [r for k, r in enumerate(runs) if shard_of(k, n) == i]
    pending = [r for r in mine if not is_done(r)]
    # each run's settings against the store, and its folder (one pkd-cache did not write is refused), before
    # anything is written or trained
    check_runs([r.config for r in pending], [r.name for r in pending])
    out.mkdir(parents=True, exist_ok=True)
    mark_folder(out, "sweep", "sweep")
    write_plan(out, config, store.hidden_size)
    part = f" (shard {i}/{n}: {len(mine)} of them)" if n > 1 else ""
    log(f"sweep: {len(runs)} runs{part}, {len(mine) - len(pending)} already done, {len(pending)} to train "
        f"({config.students_per_pass} per pass over the store)")
    groups: dict[str, list[Run]] = {}
    for r in pending:
        groups.setdefault(json.dumps(pass_settings(r.config), sort_keys=True, default=str), []).append(r)
    passes = [g[k:k + config.students_per_pass] for g in groups.values()
              for k in range(0, len(g), config.students_per_pass)]
    for k, group in enumerate(passes):
        log(f"sweep pass {k + 1}/{len(passes)}: {', '.join(r.name for r in group)}")
        distill_many([r.config for r in group], description=f"sweep {k + 1}/{len(passes)}", hint=False)
        write_report(out, finished(runs), config.top, quiet=True, store=store)
    return write_report(out, finished(runs), config.top, store=store)


PLAN_FILE = "sweep.json"


def _check_folder(out: Path, shown: str, inputs: list) -> None:
    """A sweep writes into an empty folder or its own (to resume or extend it), never into anything else, nor
    one of its inputs. Each run folder is then checked as a `distill --overwrite` output is (paths.py)."""
    check_inputs(out, inputs, "--output-dir", shown)
    if out.exists() and not out.is_dir():
        raise PkdCacheError(f"--output-dir {shown} exists and is not a directory")
    found = output_kind(out) if entries(out) else "sweep"
    if found != "sweep":
        what = f"a pkd-cache {KIND_NAMES[found]}" if found else "not a folder pkd-cache wrote"
        raise PkdCacheError(f"--output-dir {shown} already exists and is {what}, not a sweep's folder (no "
                            f"{PLAN_FILE}); choose another --output-dir, or an empty one")


def write_plan(out: Path, config: SweepConfig, hidden_size: int) -> None:
    """sweep.json: what `--collect` needs to re-plan the grid. Every shard writes the same one; a shard finding
    another sweep's plan in the folder refuses, so two different sweeps never mix their runs."""
    plan = {"grid": config.grid, "base": to_dict(config.base), "students_per_pass": config.students_per_pass,
            "hidden_size": hidden_size, "shards": config.shard[1]}
    path = out / PLAN_FILE
    if config.shard[1] > 1 and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None  # a torn file from an older version; rewritten below
        if old is not None and {k: old.get(k) for k in ("grid", "base")} != json.loads(json.dumps(
                {k: plan[k] for k in ("grid", "base")})):
            raise PkdCacheError(f"{out} holds another sweep (a different grid or settings in {PLAN_FILE}); give "
                                f"every shard the same options, or another --output-dir")
    tmp = out / f".{PLAN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    tmp.replace(path)


def finished(runs: list) -> list:
    """The runs whose results are theirs (not missing, torn, or another run's settings): what a report shows."""
    return [r for r in runs if is_done(r)]


def collect(folder: str, top: int = 10) -> list[dict]:
    """`sweep --collect DIR`: results.csv, the table and the plot over every finished run of the sweep in DIR
    (written by any number of shards); logs the runs not finished yet."""
    from .sweep_report import write_report

    out = Path(folder).expanduser()
    path = out / PLAN_FILE
    if not path.is_file():
        raise PkdCacheError(f"--collect {folder}: no {PLAN_FILE} there (is it a sweep's --output-dir?)")
    try:
        plan = json.loads(path.read_text())
        base = dict(plan["base"])
        base["train"] = TrainConfig(**base["train"])
        base["output_dir"] = str(out)  # the folder may be mounted elsewhere than where the shards ran
        config = SweepConfig(base=DistillConfig(**base), grid=plan["grid"], top=top)
        runs = plan_runs(config, int(plan["hidden_size"]))
    except (ValueError, KeyError, TypeError) as e:
        raise PkdCacheError(f"--collect {folder}: {PLAN_FILE} is not a sweep plan this version reads ({e})") from None
    shards = int(plan.get("shards", 1))
    missing = [(k, r) for k, r in enumerate(runs) if not is_done(r)]
    rows = write_report(out, finished(runs), top, store=_store_if_there(config.base))
    if missing:
        names = ", ".join(f"{r.name} (shard {shard_of(k, shards)}/{shards})" for k, r in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        log(f"collect: {len(runs) - len(missing)} of {len(runs)} runs finished; not finished: {names}{more}")
    else:
        log(f"collect: all {len(runs)} runs finished")
    return rows


def _store_if_there(base: DistillConfig):
    """The sweep's store for the plot's baselines, or None where `--collect` cannot open it (moved, unreachable)."""
    from ..store.reader import open_store

    try:
        return open_store(base.store, allow_no_checksums=base.allow_no_checksums)
    except PkdCacheError:
        return None
