"""Distil a student from a pkd-cache store with the Hugging Face Trainer.

    python examples/hf_trainer.py --store sst2.zarr --student-init bert-base-uncased --output-dir student/
    # or: torchrun --nproc-per-node 4 examples/hf_trainer.py ...   /   accelerate launch examples/hf_trainer.py ...

TrainingArguments drive the run (batch sizes, schedule, logging, saving, devices, fp16/bf16); the loss is pkd-cache's
(CE + KD + patient), from the teacher outputs in the store: no teacher in memory.
"""
import argparse
import os

import torch
from transformers import TrainingArguments

import pkd_cache
from pkd_cache.data.tasks import get_task
from pkd_cache.hf import DistillationArguments, DistillationTrainer
from pkd_cache.student.init import build_student

p = argparse.ArgumentParser()
p.add_argument("--store", required=True)
p.add_argument("--student-init", required=True, help="the pretrained model whose first layers make the student")
p.add_argument("--student-layers", type=int, default=3)
p.add_argument("--output-dir", required=True)
p.add_argument("--epochs", type=float, default=4.0)
p.add_argument("--max-steps", type=int, default=-1)
a = p.parse_args()

store = pkd_cache.open_store(a.store)
student = build_student(a.student_init, get_task(store.meta.task.name), a.student_layers,
                        store.meta.tokenizer.vocab_fingerprint)
args = TrainingArguments(output_dir=a.output_dir, per_device_train_batch_size=32, learning_rate=2e-5,
                         num_train_epochs=a.epochs, max_steps=a.max_steps, warmup_steps=0.1, logging_steps=50,
                         save_strategy="no", report_to=[],
                         # CPUs under torchrun need gloo named (the Trainer picks NCCL for GPUs by itself)
                         ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1
                         and not torch.cuda.is_available() else None)
trainer = DistillationTrainer(model=student.model, args=args, store=store,
                              distillation=DistillationArguments(alpha=0.5, temperature=10.0))
trainer.train()
trainer.save_model(a.output_dir)
student.tokenizer.save_pretrained(a.output_dir)
