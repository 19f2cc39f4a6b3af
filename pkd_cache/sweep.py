"""`pkd-cache sweep`: every combination of a grid of student settings, trained from one store, resumable.

    pkd-cache sweep --store sst2.zarr --student-init P --grid 'alpha=0.2,0.5,0.7' --grid 'paper_beta=0,10,100,500' \
        --grid 'temperature=5,10,20' --output-dir runs/

Each combination is a `distill` run in `<output-dir>/<name>/` (name = its grid values). A run whose folder already
holds a `metrics.json` with the same settings is skipped, so an interrupted sweep resumes where it stopped. Runs
that share the batches (store, batch size, seed, epochs) are trained `students_per_pass` at a time in one pass over
the store (`distill_many`). After each pass, `results.csv`, the table of the best runs and `sweep.png` are
rewritten from the runs' metrics (sweep_report.py).
"""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DistillConfig, to_dict
from .errors import PkdCacheError
from .progress import log

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

    def check(self) -> None:
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
        grid[key] = list(dict.fromkeys(parsed))  # drop repeats, keep order
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
        name = "_".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "run"
        cfg.output_dir = str(Path(sweep.base.output_dir) / name)
        cfg.overwrite = True  # the sweep owns its run folders; finished ones are skipped before this matters
        cfg.check()  # a bad value fails the sweep before anything trains
        runs.append(Run(name, values, cfg))
    return runs


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


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
    return {k: v for k, v in cfg.items() if k not in ("overwrite", "output_dir")}


def sweep(config: SweepConfig) -> list[dict]:
    """Run (or resume) the grid; returns one result row per run (see sweep_report.result_rows)."""
    from .distill import _pass_settings, distill_many
    from .store.reader import open_store
    from .sweep_report import write_report

    config.check()
    config.base.check()
    store = open_store(config.base.store)
    runs = plan_runs(config, store.hidden_size)
    out = Path(config.base.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"grid": config.grid, "base": to_dict(config.base),
                                                "students_per_pass": config.students_per_pass}, indent=2) + "\n")
    pending = [r for r in runs if not is_done(r)]
    log(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} already done, {len(pending)} to train "
        f"({config.students_per_pass} per pass over the store)")
    groups: dict[str, list[Run]] = {}
    for r in pending:
        groups.setdefault(json.dumps(_pass_settings(r.config), sort_keys=True, default=str), []).append(r)
    passes = [g[i:i + config.students_per_pass] for g in groups.values()
              for i in range(0, len(g), config.students_per_pass)]
    for i, group in enumerate(passes):
        log(f"sweep pass {i + 1}/{len(passes)}: {', '.join(r.name for r in group)}")
        distill_many([r.config for r in group], description=f"sweep {i + 1}/{len(passes)}")
        write_report(out, runs, config.top, quiet=True)
    return write_report(out, runs, config.top)
