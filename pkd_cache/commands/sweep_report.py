"""A sweep's results: `results.csv` (one row per finished run), a table of the best runs, `sweep.png`."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

SETTINGS = ("student_layers", "strategy", "alpha", "beta", "temperature", "learning_rate", "epochs", "batch_size",
            "seed")


def result_rows(runs) -> list[dict]:
    """One dict per finished run (the caller passes only those: sweep.finished): its name, grid values, settings
    and results (metric, epoch, wall time)."""
    rows = []
    for run in runs:
        m = json.loads((Path(run.config.output_dir) / "metrics.json").read_text())
        cfg, train = m.get("config", {}), m.get("config", {}).get("train", {})
        metric_key = next((k for k in m if k.startswith("best_") and k not in ("best_epoch", "best_step")), None)
        row = {"run": run.name, **{f"grid_{k}": v for k, v in run.values.items()}}
        row.update({k: cfg.get(k, train.get(k)) for k in SETTINGS})
        row.update({"beta": m.get("beta"), "layer_map": " ".join(map(str, m.get("layer_map", []))),
                    "metric": metric_key[len("best_"):] if metric_key else None,
                    "best": m.get(metric_key) if metric_key else None, "best_epoch": m.get("best_epoch"),
                    "wall_seconds": round(float(m.get("wall_seconds", 0)), 1), "steps": m.get("steps"),
                    "pass_students": m.get("pass_students", 1),
                    "share_seconds": round(float(m.get("wall_seconds", 0)) / (m.get("pass_students") or 1), 1)})
        rows.append(row)
    return rows


def lower_is_better(metric: str | None) -> bool:
    """A loss (a token store's students keep their lowest `eval_loss`), not a score such as accuracy."""
    return bool(metric) and metric.endswith("loss")


def _best_first(r: dict) -> float:
    """Sort key: the best run first, whichever way its metric points; unfinished metrics last."""
    if r["best"] is None:
        return math.inf
    return r["best"] if lower_is_better(r["metric"]) else -r["best"]


def write_report(out: Path, runs, top: int, quiet: bool = False, store=None) -> list[dict]:
    """results.csv, sweep.png (with the majority class's and the teacher's dev metric from `store`, when given)
    and, unless `quiet`, the table of the best runs."""
    rows = result_rows(runs)
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        tmp = out / f".results.csv.{os.getpid()}.tmp"  # shards of one sweep may write at the same time
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(out / "results.csv")
        lines = baseline_lines(store, rows[0]["metric"]) if store is not None and rows[0]["metric"] else {}
        plot(out / "sweep.png", rows, [k for k in (runs[0].values if runs else {})], lines)
    if not quiet:
        print_best(rows, top, out)
    return rows


def print_best(rows: list[dict], top: int, out: Path) -> None:
    console = Console()
    if not rows:
        console.print("no finished runs yet")
        return
    ranked = sorted(rows, key=_best_first)[:top]
    grid_keys = [k for k in ranked[0] if k.startswith("grid_")]
    table = Table("rank", "run", *(k[len("grid_"):] for k in grid_keys), f"best {ranked[0]['metric']}", "epoch",
                  "share s", "pass s", title=f"best {len(ranked)} of {len(rows)} runs ({out / 'results.csv'}); "
                                             f"share: a run's part of its pass's time (pass s / its students)")
    for i, r in enumerate(ranked, 1):
        table.add_row(str(i), r["run"], *(str(r[k]) for k in grid_keys), f"{r['best']:.4f}", str(r["best_epoch"]),
                      f"{r['share_seconds']:.0f}", f"{r['wall_seconds']:.0f}/{r['pass_students']}")
    console.print(table)


def baseline_lines(store, metric_key: str) -> dict[str, float]:
    """{"teacher": its dev metric from the stored logits, "majority class": the metric of always predicting the
    most frequent dev label} on the split of `metric_key` (`validation_accuracy`); the majority line only for
    classification."""
    import numpy as np

    from ..data.metrics import compute_metrics
    from ..data.tasks import get_task
    from .evaluate import split_and_metric

    if store.meta.raw.get("layout") == "tokens":  # no labels or logits per example to score the teacher with
        return {}
    task = get_task(store.meta.task.name)
    split, metric = split_and_metric(metric_key, task)
    if split not in store.splits:
        return {}
    labels, logits = store.array(split, "labels")[:], store.array(split, "logits")[:]
    lines = {"teacher": compute_metrics(task, logits, labels).get(metric)}
    if not task.is_regression:
        majority = np.zeros_like(logits)
        majority[:, int(np.bincount(labels.astype(np.int64), minlength=task.num_labels).argmax())] = 1.0
        lines["majority class"] = compute_metrics(task, majority, labels).get(metric)
    return {k: float(v) for k, v in lines.items() if v is not None and math.isfinite(v)}


def plot(path: Path, rows: list[dict], keys: list[str], lines: dict[str, float] | None = None):
    """One panel per swept setting with more than one value: every run's metric against that setting, the best per
    value, and `lines` (the teacher's and the majority class's dev metric) across. Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def column(key: str) -> str:
        return f"grid_{key}" if f"grid_{key}" in rows[0] else key

    swept = [k for k in keys if len({str(r.get(column(k))) for r in rows}) > 1]
    keys = swept or keys[:1] or ["alpha"]  # a grid of one value each: one panel, so the runs still show
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    metric = rows[0]["metric"] or "metric"
    title = f"sweep: dev {metric} of {len(rows)} run(s)"
    fig.suptitle(title)
    for ax, key in zip(axes[0], keys):
        col = f"grid_{key}" if f"grid_{key}" in rows[0] else key
        values = sorted({r.get(col) for r in rows}, key=lambda v: (isinstance(v, str), v))
        xs = {v: i for i, v in enumerate(values)}
        ax.scatter([xs[r.get(col)] for r in rows], [r["best"] for r in rows], alpha=0.5, s=18)
        pick = min if lower_is_better(metric) else max
        best = [pick(r["best"] for r in rows if r.get(col) == v) for v in values]
        ax.plot(range(len(values)), best, marker="o", color="C3", label="best")
        for (name, value), style in zip((lines or {}).items(), ("--", ":")):
            ax.axhline(value, linestyle=style, color="0.35", label=f"{name} {value:.3f}")
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(f"dev {metric}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return fig
