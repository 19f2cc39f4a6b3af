"""Encoder students from a token store (issue 18, TinyBERT's general distillation at small scale).

1. `pkd_cache.dump --task lm --logits none --hidden-layers ...` of a pretrained encoder (MiniLM) over a text corpus:
   the teacher runs once, its per-token hidden states are stored.
2. `pkd_cache.distill` with the same encoder as `--student-init`: a k-layer student learns those states (hidden-state
   MSE alone, layers j -> j L / k), with no teacher in memory.
3. Both that student and the plain truncation (the encoder's first k layers, the usual init) are fine-tuned on a GLUE
   task with the same recipe and seeds; the table gives their dev accuracy.

    python benchmarks/encoder_gd_experiment.py --teacher $MINILM --corpus /work/lm/data40k/train.txt \\
        --data-dir ../shared/glue/SST-2 --work /work/gd [--lines 20000] [--layers 3] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import header, table

import pkd_cache


def truncated(teacher: str, layers: int, out: Path) -> Path:
    """The encoder's embeddings and first `layers` layers, saved as a model folder (the usual student init)."""
    from transformers import AutoModel, AutoTokenizer

    if not (out / "config.json").is_file():
        AutoModel.from_pretrained(teacher, num_hidden_layers=layers).save_pretrained(out)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


def finetune(model: Path, a, seed: int, out: Path) -> float:
    if not (out / "metrics.json").is_file():
        pkd_cache.finetune(pkd_cache.FinetuneConfig(
            model=str(model), task=a.task, output_dir=str(out), data_dir=str(a.data_dir), max_seq_length=a.seq,
            overwrite=True, max_train_samples=a.train_examples,
            train=pkd_cache.TrainConfig(epochs=1, learning_rate=a.task_lr, batch_size=32, seed=seed,
                                        logging_steps=0)))
    m = json.loads((out / "metrics.json").read_text())
    return next(v for k, v in m.items() if k.startswith("best_") and k not in ("best_epoch", "best_step"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", required=True, help="a pretrained encoder (folder or hub name)")
    p.add_argument("--corpus", type=Path, required=True, help="a text file, one document per line")
    p.add_argument("--lines", type=int, default=20000, help="documents of the corpus used")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--work", type=Path, required=True, help="where the store and the students go (kept)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--gd-lr", type=float, default=3e-4)
    p.add_argument("--gd-epochs", type=float, default=1.0)
    p.add_argument("--task-lr", type=float, default=5e-5)
    p.add_argument("--train-examples", type=int, default=8000)
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args()
    print(header())
    a.work.mkdir(parents=True, exist_ok=True)
    corpus = a.work / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text("".join(a.corpus.open().readlines()[:a.lines]))
    from transformers import AutoConfig

    depth = AutoConfig.from_pretrained(a.teacher).num_hidden_layers
    mapped = [round(j * depth / a.layers) for j in range(1, a.layers + 1)]
    t0 = time.perf_counter()
    store = pkd_cache.dump(pkd_cache.DumpConfig(
        teacher=a.teacher, task="lm", data_files=[str(corpus)], out=str(a.work / "corpus.zarr"), logits="none",
        hidden_layers=mapped, dtype="int8", sequence_mode="cut", max_seq_length=a.seq))
    info = store.info()
    tokens = info["splits"]["train"]["num_tokens"]
    print(f"store: {tokens:,} tokens, hidden layers {mapped} (int8), {store.size_bytes() / tokens:.0f} B/token, "
          f"dumped at {tokens / info['dump_seconds']:,.0f} tok/s ({time.perf_counter() - t0:.0f}s)", flush=True)
    gd = a.work / "gd-student"
    if not (gd / "metrics.json").is_file():
        t0 = time.perf_counter()
        pkd_cache.distill(pkd_cache.DistillConfig(
            store=store.path, student_init=a.teacher, student_layers=a.layers, beta=1.0, output_dir=str(gd),
            overwrite=True, train=pkd_cache.TrainConfig(epochs=a.gd_epochs, learning_rate=a.gd_lr, batch_size=32,
                                                        logging_steps=50, eval_strategy="steps", eval_steps=50)))
        print(f"general distillation: {time.perf_counter() - t0:.0f}s", flush=True)
    gd_metrics = json.loads((gd / "metrics.json").read_text())
    print(f"general distillation: hidden-state MSE {gd_metrics['history'][0]['train_subset_loss']:.4f} -> "
          f"{gd_metrics['best_train_subset_loss']:.4f} over {gd_metrics['steps']} steps", flush=True)
    inits = {"first k layers": truncated(a.teacher, a.layers, a.work / "truncated"), "general distillation": gd}
    rows = []
    for name, model in inits.items():
        scores = [finetune(model, a, int(s), a.work / f"task-{model.name}-seed{s}") for s in a.seeds.split(",")]
        rows.append((name, *(round(s, 4) for s in scores), round(sum(scores) / len(scores), 4)))
        print(rows[-1], flush=True)
    print(table(rows, (f"init of the {a.layers}-layer student", *(f"dev acc seed {s}" for s in a.seeds.split(",")), "mean")))


if __name__ == "__main__":
    main()
