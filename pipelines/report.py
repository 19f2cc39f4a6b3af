"""Summarise a pkd_study.sh output folder as a markdown table: dev metric and wall time of every stage.

    python pipelines/report.py OUT_DIR
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def best_metric(metrics: dict) -> tuple[str, float]:
    key = next(k for k in metrics if k.startswith("best_") and k != "best_epoch")
    return key[len("best_"):], metrics[key]


def main(out: Path) -> str:
    times = {}
    if (out / "times.tsv").is_file():
        with open(out / "times.tsv") as f:
            times = {r["stage"]: int(r["seconds"]) for r in csv.DictReader(f, delimiter="\t")}
    rows = ["| model | layers | alpha | beta | T | layer map | dev metric | value | wall time |",
            "|---|---|---|---|---|---|---|---|---|"]
    teacher = out / "teacher" / "metrics.json"
    if teacher.is_file():
        m = json.loads(teacher.read_text())
        name, value = best_metric(m)
        rows.append(f"| teacher (fine-tuned) | {_teacher_layers(out)} | - | - | - | - | {name} | {100 * value:.2f} | "
                    f"{_fmt(times.get('teacher', m.get('wall_seconds')))} |")
    if "dump" in times:
        rows.append(f"| dump (all splits) | | | | | | | | {_fmt(times['dump'])} |")
    for label, folder in (("fine-tuning", "ft"), ("vanilla KD", "kd"), ("PKD-skip", "pkd-skip"), ("PKD-last", "pkd-last")):
        path = out / "students" / folder / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        name, value = best_metric(m)
        beta = f"{m['beta']:.3g}" if m["beta"] else "0"
        lmap = ",".join(map(str, m["layer_map"])) if m["beta"] else "-"
        temperature = f"{m['temperature']:g}" if m["alpha"] else "-"
        rows.append(f"| student: {label} | {m['student_layers']} | {m['alpha']:g} | {beta} | {temperature} | "
                    f"{lmap} | {name} | {100 * value:.2f} | {_fmt(times.get('student-' + folder, m.get('wall_seconds')))} |")
    return "\n".join(rows) + "\n"


def _teacher_layers(out: Path) -> str:
    cfg = out / "teacher" / "config.json"
    return str(json.loads(cfg.read_text()).get("num_hidden_layers", "?")) if cfg.is_file() else "?"


def _fmt(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s"


if __name__ == "__main__":
    print(main(Path(sys.argv[1])), end="")
