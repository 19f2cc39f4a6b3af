"""`pkd-cache bench-student`: a student's size and inference speed next to its teacher's (the PKD paper's Table 2).

Both models run the same random token batches under `inference_mode`, after warm-up: latency is the median time
of a batch of one, throughput the examples per second of a full batch. On GPU the clock is read after a
synchronise. The ratios are what to compare (a 6-of-12-layer student is about 1.9x faster, 3-of-12 about 3.7x).
torch and transformers are imported only once the config has passed its check, so a bad option fails at once.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..errors import PkdCacheError

if TYPE_CHECKING:
    import torch


@dataclass
class BenchStudentConfig:
    model: str
    teacher: Optional[str] = None  # default: none (the student alone)
    batch_size: int = 32
    seq_length: int = 128
    iterations: int = 20
    device: Optional[str] = None

    def check(self) -> None:
        from ..config import check_device

        for name in ("batch_size", "seq_length", "iterations"):
            if getattr(self, name) <= 0:
                raise PkdCacheError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        check_device(self.device)


def _load(path: str, device):
    from transformers import AutoModelForSequenceClassification

    from ..models import resolve_model_name

    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_name(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PkdCacheError(f"cannot load {path} as a sequence-classification model: {first}") from e
    return model.to(device).eval()


def _timings(model, cfg: BenchStudentConfig, device: torch.device) -> tuple[float, float]:
    """(median seconds of a batch of 1, examples/s at cfg.batch_size)."""
    import torch

    with torch.inference_mode():
        return _timed_runs(model, cfg, device)


def _timed_runs(model, cfg: BenchStudentConfig, device: torch.device) -> tuple[float, float]:
    import torch

    vocab = model.config.vocab_size
    seq = min(cfg.seq_length, getattr(model.config, "max_position_embeddings", cfg.seq_length))
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (n, seq), generator=gen).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def timed(inputs) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one, full = batch(1), batch(cfg.batch_size)
    for _ in range(3):  # warm-up: allocator, kernels
        timed(one), timed(full)
    latency = statistics.median(timed(one) for _ in range(cfg.iterations))
    throughput = cfg.batch_size / statistics.median(timed(full) for _ in range(max(3, cfg.iterations // 4)))
    return latency, throughput


def bench_student(cfg: BenchStudentConfig) -> list[dict]:
    """One row per model: layers, hidden, parameters, latency (ms, batch 1), throughput (ex/s), speed-up."""
    cfg.check()  # before torch is imported (seconds)
    from ..training import resolve_device

    device = resolve_device(cfg.device)
    rows = []
    for role, path in (("teacher", cfg.teacher), ("student", cfg.model)):
        if path is None:
            continue
        model = _load(path, device)
        latency, throughput = _timings(model, cfg, device)
        rows.append({"model": role, "path": path, "layers": model.config.num_hidden_layers,
                     "hidden": model.config.hidden_size, "parameters": sum(p.numel() for p in model.parameters()),
                     "latency_ms": latency * 1000, "throughput": throughput, "device": str(device)})
        del model
    if len(rows) == 2:
        t, s = rows
        s["params_ratio"] = s["parameters"] / t["parameters"]
        s["speedup_latency"] = t["latency_ms"] / s["latency_ms"]
        s["speedup_throughput"] = s["throughput"] / t["throughput"]
    return rows


def print_rows(rows: list[dict], cfg: BenchStudentConfig) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "layers", "hidden", "parameters", "latency ms (batch 1)",
                  f"throughput ex/s (batch {cfg.batch_size})", "speed-up", "params",
                  title=f"inference, {cfg.seq_length} tokens, {rows[0]['device']}, {torch.get_num_threads()} threads")
    for r in rows:
        table.add_row(r["model"], str(r["layers"]), str(r["hidden"]), f"{r['parameters'] / 1e6:.1f}M",
                      f"{r['latency_ms']:.1f}", f"{r['throughput']:,.0f}",
                      f"{r['speedup_throughput']:.2f}x" if "speedup_throughput" in r else "1.00x",
                      f"{r['params_ratio']:.2f}" if "params_ratio" in r else "1.00")
    Console().print(table)
