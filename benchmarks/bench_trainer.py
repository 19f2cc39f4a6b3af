"""Distillation throughput: `pkd_cache.hf.DistillationTrainer` (the transformers Trainer) against `pkd-cache
distill`, the same student, store, batches and steps, one after the other in one process.

    python benchmarks/bench_trainer.py [--examples 4096] [--steps 60] [--batch-size 32] [--rounds 2]

The real MiniLM-L6 teacher's outputs for the first N SST-2 train examples (plus dev) are dumped once (max length
64); then a 3-layer student from MiniLM trains `--steps` steps each way (alpha 0.5, T 10, PKD-skip patient loss),
with no evaluation or saving inside the timed loop. Each side's rate is its own training loop's (pkd-cache's
progress line, the Trainer's train_runtime). Goal (issue 17): the Trainer at >= 0.9 of pkd-cache distill.
"""
from __future__ import annotations

import argparse
import logging
import re
import statistics
import tempfile
from pathlib import Path

from common import GLUE, header, minilm, minilm_teacher, table

import pkd_cache


class Rates(logging.Handler):
    """pkd-cache's progress lines: '... 60 step in 19.2s (3.1 step/s)'."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def emit(self, record):
        m = re.search(r"([\d.]+) step/s\)", record.getMessage())
        if m:
            self.rates.append(float(m.group(1)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three runs, each round in reverse order")
    a = p.parse_args()
    print(header())
    import torch
    from transformers import TrainingArguments

    from pkd_cache.data.tasks import get_task
    from pkd_cache.hf import DistillationTrainer
    from pkd_cache.student.init import build_student

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = minilm_teacher(tmp / "teacher")
        store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(GLUE / "SST-2"),
                                                    out=str(tmp / "s.zarr"), max_seq_length=64,
                                                    max_examples=a.examples))
        init = minilm()
        rates = Rates()
        logging.getLogger("pkd_cache").addHandler(rates)
        runs = {"pkd-cache distill": [], "pkd-cache distill --dataloader-num-workers 0": [],
                "DistillationTrainer (transformers Trainer)": []}

        def ours(name: str, workers):
            pkd_cache.distill(pkd_cache.DistillConfig(
                store=store.path, output_dir=str(tmp / f"distill{len(rates.rates)}"), student_layers=3,
                student_init=init, dataloader_num_workers=workers,
                train=pkd_cache.TrainConfig(max_steps=a.steps, batch_size=a.batch_size, logging_steps=0,
                                            eval_strategy="no")))
            runs[name].append(rates.rates[-1])

        def theirs(name: str, _):
            torch.manual_seed(0)
            student = build_student(init, get_task("sst2"), 3, store.meta.tokenizer.vocab_fingerprint).model
            args = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=a.batch_size,
                                     max_steps=a.steps, learning_rate=2e-5, warmup_steps=0.1, logging_steps=10_000,
                                     save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                                     disable_tqdm=True)
            trainer = DistillationTrainer(model=student, args=args, store=store, alpha=0.5, temperature=10.0)
            runs[name].append(trainer.train().metrics["train_steps_per_second"])

        order = [(ours, "pkd-cache distill", None), (ours, "pkd-cache distill --dataloader-num-workers 0", 0),
                 (theirs, "DistillationTrainer (transformers Trainer)", None)]
        for r in range(a.rounds):  # each round in the reverse order of the last: drift hits every side alike
            for fn, name, arg in (order if r % 2 == 0 else order[::-1]):
                fn(name, arg)
    base = statistics.median(runs["pkd-cache distill"])
    rows = [(name, a.steps, " ".join(f"{v:.2f}" for v in v_), f"{statistics.median(v_):.2f}",
             f"{statistics.median(v_) / base:.2f}") for name, v_ in runs.items()]
    print(table(rows, ("loop", "steps", "steps/s of each round (its training loop)", "median", "vs pkd-cache distill")))
    trainer = statistics.median(runs["DistillationTrainer (transformers Trainer)"]) / base
    print(f"\ngoal (issue 17): the Trainer at >= 0.9 of pkd-cache distill; here {trainer:.2f}")


if __name__ == "__main__":
    main()
