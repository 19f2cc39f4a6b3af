"""B4 and B5: a PKD step from the store against plain fine-tuning and against online KD, same student and batches.

    python benchmarks/bench_distill.py [--steps 40] [--examples 4096] [--device cpu|cuda]

The teacher is the real MiniLM-L6 (6 layers) with a 2-label head, the student its first 3 layers (PKD-skip 2,4).
B4: store step / plain fine-tuning step (the student alone, batches already in memory); goal <= 1.05.
B5: online KD step (teacher forward every step) / store step, against the FLOP bound: a 6-layer teacher forward
    (6) plus a 3-layer student forward and backward (3 x 3) over the student alone (9): 15/9 = 1.67; goal: >= 0.95
    of the bound.

PKD_GLUE=DIR reads SST-2 from DIR/SST-2 instead of ../shared/glue; PKD_MINILM_CONFIG=DIR (MiniLM's config.json and
tokenizer files) runs a MiniLM with random weights, teacher and student init, instead of the installed one: the same
speed (common.py).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import GLUE, header, minilm, minilm_teacher, synchronize, table

import pkd_cache
from pkd_cache.data.tasks import get_task
from pkd_cache.data.tokenize import to_model_inputs
from pkd_cache.student.init import build_student, student_cls
from pkd_cache.student.losses import LossWeights, hard_loss, pkd_loss
from pkd_cache.models import load_for_task
from pkd_cache.teacher.run import teacher_outputs

LMAP = [2, 4]


def timed_steps(student, opt, batches, step_loss, warmup: int, device) -> float:
    """Mean seconds per optimiser step over the batches after `warmup` (forward, loss, backward, step)."""
    def step(batch):
        loss = step_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, batches, warmup, device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    print(header())
    w = LossWeights(alpha=0.5, beta=100 / 384, temperature=10.0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher_dir = minilm_teacher(tmp / "teacher")
        store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", out=str(tmp / "s.zarr"),
                                                    data_dir=str(GLUE / "SST-2"), splits=["train"], max_seq_length=64,
                                                    max_examples=a.examples, device=a.device))
        n = a.steps + a.warmup

        def store_batches():  # read from the store on every use, as distill does
            it = store.batches("train", a.batch_size, shuffle=True, seed=0, layers=LMAP,
                               pin_memory=device.type == "cuda")
            return (b for _, b in zip(range(n), it))

        in_memory = list(store_batches())
        student = build_student(minilm(), get_task("sst2"), 3, None).model.to(device).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        teacher = load_for_task(str(teacher_dir), get_task("sst2")).model.to(device).eval()

        def finetune_loss(b):
            return hard_loss(student(**to_model_inputs(b, device)).logits, b["labels"].to(device), False)

        def pkd_from(b, logits, cls):
            out = student(**to_model_inputs(b, device), output_hidden_states=True)
            batch = {"labels": b["labels"].to(device, non_blocking=True), "logits": logits, "cls": cls}
            return pkd_loss(out.logits, student_cls(out.hidden_states, 3), batch, w, False)[0]

        def store_loss(b):
            return pkd_from(b, b["logits"].to(device, non_blocking=True), b["cls"].to(device, non_blocking=True))

        def online_loss(b):
            logits, cls = teacher_outputs(teacher, to_model_inputs(b, device))
            return pkd_from(b, logits, cls[:, LMAP])

        ft = timed_steps(student, opt, in_memory, finetune_loss, a.warmup, device)
        from_store = timed_steps(student, opt, store_batches(), store_loss, a.warmup, device)
        online = timed_steps(student, opt, in_memory, online_loss, a.warmup, device)
        # What bounds B5 on this machine: the costs that make up a step, each timed alone on the same batches.
        teacher_fwd = timed(lambda b: teacher_outputs(teacher, to_model_inputs(b, device)), in_memory, a.warmup, device)
        student_fwd = timed(lambda b: store_loss(b).detach(), in_memory, a.warmup, device)
    measured_bound = (teacher_fwd + from_store) / from_store
    rows = [("B4 store step / fine-tuning step", ft, from_store, from_store / ft, "<= 1.05"),
            ("B5 online KD step / store step", from_store, online, online / from_store,
             f">= {0.95 * 15 / 9:.2f} (0.95 x 1.67)")]
    print(table(rows, ("measure", "reference s/step", "measured s/step", "ratio", "goal")))
    parts = [("teacher forward (inference mode), 6 layers", teacher_fwd),
             ("student forward + losses, 3 layers", student_fwd),
             ("student backward + optimiser step (store step - forward)", from_store - student_fwd),
             ("backward / forward of the student", (from_store - student_fwd) / student_fwd),
             ("B5 bound from these costs: (teacher fwd + store step) / store step", measured_bound),
             ("B5 measured / bound from these costs", online / from_store / measured_bound)]
    print("\n" + table(parts, ("part of a step", "s/step or ratio")))


def timed(fn, batches, warmup: int, device) -> float:
    """Mean seconds of `fn(batch)` over the batches after `warmup`."""
    t0 = None
    for i, batch in enumerate(batches):
        if i == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        fn(batch)
    synchronize(device)
    return (time.perf_counter() - t0) / (i + 1 - warmup)


if __name__ == "__main__":
    main()
