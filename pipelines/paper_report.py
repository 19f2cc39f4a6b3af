"""The report of pkd_paper.sh: the paper's Table 1 for one task (teacher, then the best dev setting of each student
method), whether the paper's ordering PKD >= vanilla KD >= fine-tuning holds here, and a bar chart.

With several seeds (the recipe's SEEDS), the runs of one setting that differ only in seed are grouped: each method's
best setting is the one with the highest mean dev metric (among those with the most finished seeds), the table
shows mean +- sample std and every seed, and the ordering is checked on means, with each gap marked when it is
smaller than the seeds' spread.

    python pipelines/paper_report.py OUT_DIR       # writes OUT_DIR/results.md and OUT_DIR/table1.png
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

METHODS = (("fine-tuning", "ft"), ("vanilla KD", "kd"), ("PKD-skip", "pkd-skip"), ("PKD-last", "pkd-last"))
SHOWN = ("alpha", "beta", "grid_paper_beta", "temperature", "learning_rate", "layer_map")


@dataclass
class MethodResult:
    """A method's best setting: its runs (one per seed) and how many runs the method's sweep finished."""

    runs: list[dict]
    finished: int

    @property
    def values(self) -> list[float]:
        return [float(r["best"]) for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def setting_of(row: dict) -> tuple:
    """A run's grid values other than its seed: the runs of one setting across seeds share it."""
    return tuple(sorted((k, v) for k, v in row.items() if k.startswith("grid_") and k != "grid_seed"))


def best_of(path: Path) -> Optional[MethodResult]:
    """The setting of a sweep's results.csv with the most finished seeds and, among those, the best mean."""
    if not path.is_file():
        return None
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("best")]
    if not rows:
        return None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(setting_of(r), []).append(r)
    best = max(groups.values(), key=lambda g: (len(g), statistics.fmean(float(r["best"]) for r in g)))
    return MethodResult(sorted(best, key=lambda r: int(r["seed"])), len(rows))


def number(text: str) -> str:
    """A CSV value as written for people: 0.2604166666666667 -> 0.260417; text that is not a number unchanged."""
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def value_text(res: MethodResult) -> str:
    if len(res.runs) == 1:
        return f"{100 * res.mean:.2f}"
    return f"{100 * res.mean:.2f} ± {100 * res.std:.2f}"


def report(out: Path) -> str:
    lines = [f"# PKD study: {out.name}", "",
             "| model | layers | dev metric | value | seeds | runs | best settings |", "|---|---|---|---|---|---|---|"]
    teacher = out / "teacher" / "metrics.json"
    if teacher.is_file():
        m = json.loads(teacher.read_text())
        key = next(k for k in m if k.startswith("best_") and k != "best_epoch")
        layers = json.loads((out / "teacher" / "config.json").read_text()).get("num_hidden_layers", "?")
        seed = m.get("config", {}).get("train", {}).get("seed", "")
        lines.append(f"| teacher (fine-tuned) | {layers} | {key[5:]} | {100 * m[key]:.2f} | {seed} | 1 | |")
    best: dict[str, MethodResult] = {}
    for label, folder in METHODS:
        res = best_of(out / "sweeps" / folder / "results.csv")
        if res is None:
            continue
        best[label] = res
        row = res.runs[0]
        settings = [f"{k.removeprefix('grid_')} {number(row[k])}" for k in SHOWN if row.get(k) not in (None, "")]
        settings.append("best_epoch " + "/".join(r["best_epoch"] for r in res.runs))
        seeds = ", ".join(f"{r['seed']}: {100 * float(r['best']):.2f}" for r in res.runs)
        lines.append(f"| student: {label} | {row['student_layers']} | {row['metric']} | {value_text(res)} | "
                     f"{seeds} | {res.finished} | {', '.join(settings)} |")
    lines += ["", ordering(best)]
    if best:
        plot(out / "table1.png", best, out.name)
        lines += ["", "![best dev setting per method](table1.png)"]
    return "\n".join(lines) + "\n"


def ordering(best: dict[str, MethodResult]) -> str:
    """Does PKD >= vanilla KD >= fine-tuning hold (with the better of PKD-skip/-last as PKD)?"""
    if not all(k in best for k in ("fine-tuning", "vanilla KD")) or not any(k.startswith("PKD") for k in best):
        return "The ordering cannot be checked yet: some methods have no finished runs."
    pkd = max((v for k, v in best.items() if k.startswith("PKD")), key=lambda r: r.mean)
    kd, ft = best["vanilla KD"], best["fine-tuning"]
    verdict = "holds" if pkd.mean >= kd.mean >= ft.mean else "does not hold"
    n = min(len(r.runs) for r in best.values())
    if n == 1:
        basis = "best dev run of each sweep; one seed"
    else:
        basis = f"mean over {n}+ seeds of each method's best setting"
    text = (f"Paper's ordering PKD >= vanilla KD >= fine-tuning {verdict} here: PKD {100 * pkd.mean:.2f}, "
            f"KD {100 * kd.mean:.2f}, FT {100 * ft.mean:.2f} ({basis}).")
    if n > 1:
        gaps = [f"{name} {100 * (a.mean - b.mean):+.2f}" + (" (within noise)" if noise(a, b) else "")
                for name, a, b in (("PKD - KD", pkd, kd), ("KD - FT", kd, ft))]
        text += (f" Gaps in points: {', '.join(gaps)}; a gap is within noise when it is smaller than the larger "
                 "seed standard deviation of its two methods.")
    return text


def noise(a: MethodResult, b: MethodResult) -> bool:
    return abs(a.mean - b.mean) < max(a.std, b.std)


def plot(path: Path, best: dict[str, MethodResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(best)
    values = [100 * r.mean for r in best.values()]
    errors = [100 * r.std for r in best.values()]
    ax.bar(names, values, yerr=errors if any(errors) else None, capsize=4,
           color=["C7", "C0", "C2", "C3"][:len(names)])
    ax.set_ylim(max(0, min(values) - 5), min(100, max(v + e for v, e in zip(values, errors)) + 2))
    for i, v in enumerate(values):
        ax.text(i, v + errors[i] + 0.2, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("dev metric (mean over seeds)" if any(errors) else "best dev metric")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    text = report(folder)
    (folder / "results.md").write_text(text)
    print(text, end="")
