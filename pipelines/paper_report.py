"""The report of pkd_paper.sh: the paper's Table 1 for one task (teacher, then the best dev run of each student
method), whether the paper's ordering PKD >= vanilla KD >= fine-tuning holds here, and a bar chart.

    python pipelines/paper_report.py OUT_DIR       # writes OUT_DIR/results.md and OUT_DIR/table1.png
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Optional

METHODS = (("fine-tuning", "ft"), ("vanilla KD", "kd"), ("PKD-skip", "pkd-skip"), ("PKD-last", "pkd-last"))
SHOWN = ("alpha", "beta", "grid_paper_beta", "temperature", "learning_rate", "layer_map", "best_epoch")


def best_of(path: Path) -> tuple[Optional[dict], int]:
    """The best row of a sweep's results.csv, and how many finished runs it has."""
    if not path.is_file():
        return None, 0
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("best")]
    return (max(rows, key=lambda r: float(r["best"])) if rows else None), len(rows)


def report(out: Path) -> str:
    lines = [f"# PKD study: {out.name}", "",
             "| model | layers | dev metric | value | runs | best settings |", "|---|---|---|---|---|---|"]
    teacher = out / "teacher" / "metrics.json"
    if teacher.is_file():
        m = json.loads(teacher.read_text())
        key = next(k for k in m if k.startswith("best_") and k != "best_epoch")
        layers = json.loads((out / "teacher" / "config.json").read_text()).get("num_hidden_layers", "?")
        lines.append(f"| teacher (fine-tuned) | {layers} | {key[5:]} | {100 * m[key]:.2f} | 1 | |")
    best = {}
    for label, folder in METHODS:
        row, n = best_of(out / "sweeps" / folder / "results.csv")
        if row is None:
            continue
        best[label] = float(row["best"])
        settings = ", ".join(f"{k.removeprefix('grid_')} {row[k]}" for k in SHOWN if row.get(k) not in (None, ""))
        lines.append(f"| student: {label} | {row['student_layers']} | {row['metric']} | {100 * best[label]:.2f} | "
                     f"{n} | {settings} |")
    lines += ["", ordering(best)]
    if best:
        plot(out / "table1.png", best, out.name)
        lines += ["", "![best dev run per method](table1.png)"]
    return "\n".join(lines) + "\n"


def ordering(best: dict) -> str:
    """Does PKD >= vanilla KD >= fine-tuning hold (with the better of PKD-skip/-last as PKD)?"""
    if not all(k in best for k in ("fine-tuning", "vanilla KD")) or not any(k.startswith("PKD") for k in best):
        return "The ordering cannot be checked yet: some methods have no finished runs."
    pkd = max(v for k, v in best.items() if k.startswith("PKD"))
    kd, ft = best["vanilla KD"], best["fine-tuning"]
    verdict = "holds" if pkd >= kd >= ft else "does not hold"
    return (f"Paper's ordering PKD >= vanilla KD >= fine-tuning {verdict} here: PKD {100 * pkd:.2f}, "
            f"KD {100 * kd:.2f}, FT {100 * ft:.2f} (best dev run of each sweep; one seed).")


def plot(path: Path, best: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names, values = list(best), [100 * v for v in best.values()]
    ax.bar(names, values, color=["C7", "C0", "C2", "C3"][:len(names)])
    ax.set_ylim(max(0, min(values) - 5), min(100, max(values) + 2))
    for i, v in enumerate(values):
        ax.text(i, v + 0.2, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("best dev metric")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    text = report(folder)
    (folder / "results.md").write_text(text)
    print(text, end="")
