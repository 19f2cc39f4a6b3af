"""Issue 18's experiment, step 2: distil a smaller causal-LM student from the teacher of lm_teacher.py, one run per
kind of target, all with the same init, seed, data order and steps.

    python benchmarks/lm_experiment.py --teacher /work/lm/teacher --data /work/lm/data [--student-layers 2]
        [--steps 1000] [--batch 16] [--seq 128] [--lr 5e-4] [--alpha 0.5] [--temperature 1.0]
        [--runs ce,full,topk:12,topk:64,sample:12,sample:64]

Runs: "ce" (next-token CE only, alpha = 0), "full" (online full-logit KD, FullKDLoss), "topk:K" (TopKKDLoss: K
log-probs + the leftover bucket), "sample:N" (SampledKDLoss, RS-KD: N draws as ids + counts). Every student is the
teacher's first --student-layers blocks (causal_lm_student) trained with AdamW, linear warm-up then cosine to 0.1 x
--lr, on the training text packed into --seq-token sequences (corpus.py "pack"; batches as lm_teacher.py's), loss
CE + alpha x KD (TokenKD). The targets come from the teacher ONLINE, each step (`online_targets`; the sparse ones
drawn with a torch.Generator seeded by (seed, step), so reruns are identical): a store reader will replace that
one function with targets read from a dump.

Reported per run: held-out perplexity (as `pkd-cache eval --task lm` scores it), the mean train CE of the last 10 steps, the
student's step speed (forward + loss + backward + AdamW: what training from a store costs, reading aside), the
teacher's (forward + target making: what a dump costs, writing aside), the speed of coding the targets
(store/sparse_codec.py), and bytes per token of the first --byte-batches batches' targets: as coded, and after
Blosc zstd-3 per array as the store compresses them (benchmarks/bench_token_bytes.py's `stored`; it shaves a bit
off the float16 log-probs and n_unique, nothing off the Rice-coded ids). "full" shows dense float16 logits.
Speeds are wall-clock on this machine, with whatever else runs on it.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from bench_token_bytes import stored
from common import corpus_file, header, table
from lm_teacher import perplexity

from pkd_cache.data.corpus import load_corpus, token_budget_batches, tokenize_corpus
from pkd_cache.store import sparse_codec
from pkd_cache.student.causal_lm import TokenKD, causal_lm_student, check_same_vocab
from pkd_cache.student.sparse_kd import sample_targets, topk_targets

RUNS = "ce,full,topk:12,topk:64,sample:12,sample:64"


def parse_run(run: str) -> tuple[str, int]:
    kind, _, n = run.partition(":")
    if kind in ("ce", "full") and not n:
        return kind, 0
    if kind in ("topk", "sample") and n.isdigit() and int(n) >= 1:
        return kind, int(n)
    raise SystemExit(f"unknown run {run!r}: use ce, full, topk:K or sample:N")


@torch.no_grad()
def online_targets(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str,
                   generator: torch.Generator, temperature: float = 1.0):
    """The KD targets of one batch, per position (leading dims [B, S]), in TokenKD's format: None for "ce", the
    teacher's logits [B, S, V] for "full", (ids, logprobs) [B, S, K] for "topk:K", (ids, counts) [B, S, M] for
    "sample:N". Made from the teacher (in eval mode) now; a store reader returns the same from a dump."""
    name, n = parse_run(kind)
    if name == "ce":
        return None
    if teacher.training:
        raise ValueError("the teacher must be in eval mode (dropout would make the targets random)")
    logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    if name == "full":
        return logits
    flat = logits.reshape(-1, logits.shape[-1])
    ids, other = (sample_targets(flat, n, generator, temperature) if name == "sample"
                  else topk_targets(flat, n, temperature))
    return ids.reshape(*input_ids.shape, -1), other.reshape(*input_ids.shape, -1)


def coded(targets, attention_mask: torch.Tensor, kind: str, vocab: int) -> tuple[int, int, int, float]:
    """(coded bytes, after Blosc, real tokens, seconds to code) of one batch's targets (its real positions)."""
    name, n = parse_run(kind)
    real = attention_mask.bool()
    t0 = time.perf_counter()
    if name == "full":
        arrays = {"logits": targets[real].numpy().astype(np.float16)}
    else:
        ids, other = (t[real].numpy() for t in targets)
        arrays = (sparse_codec.encode_sampled(ids, other, n, vocab) if name == "sample"
                  else sparse_codec.encode_topk(ids, other, vocab))
    seconds = time.perf_counter() - t0
    arrays = list(arrays.values())
    return sum(a.nbytes for a in arrays), stored(arrays), int(real.sum()), seconds


def batches(train, steps: int, batch: int, seq: int, seed: int, pad: int):
    """The first `steps` batches of the training plan (the same for every run): (input_ids, attention_mask)."""
    ids, epoch, n = torch.from_numpy(train.input_ids.astype(np.int64)), 0, 0
    while True:
        for b in token_budget_batches(train.offsets, batch * seq, seed=seed, epoch=epoch):
            seqs = [ids[train.offsets[i]:train.offsets[i + 1]] for i in b]
            yield (torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad),
                   torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs],
                                                   batch_first=True))
            n += 1
            if n == steps:
                return
        epoch += 1


def online_source(a, teacher, train, pad: int, run: str):
    """(input_ids, attention_mask, targets) of the training plan, the targets made by the teacher now."""
    for step, (x, mask) in enumerate(batches(train, a.steps, a.batch, a.seq, a.seed, pad)):
        yield x, mask, online_targets(teacher, x, mask, run, torch.Generator().manual_seed(a.seed * 1_000_003 + step),
                                      a.temperature)


def train_run(run: str, a, teacher, train, held, vocab: int, pad: int, source=None) -> tuple:
    """One student. `source` yields (input_ids, attention_mask, targets) (default: `online_source`; a store's
    batches in lm_store_experiment.py)."""
    name, _ = parse_run(run)
    torch.manual_seed(a.seed)  # dropout: the same stream in every run
    student = causal_lm_student(str(a.teacher), a.student_layers)
    check_same_vocab(student, vocab, "the teacher")
    loss_fn = TokenKD("full" if name == "ce" else name, alpha=0.0 if name == "ce" else a.alpha,
                      temperature=a.temperature)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, min(100, a.steps // 10))
    t_teacher = t_student = t_code = 0.0
    tokens = code_tokens = byte_sum = blosc_sum = 0
    ces = []
    source = online_source(a, teacher, train, pad, run) if source is None else source
    t0 = time.perf_counter()
    for step, (x, mask, targets) in enumerate(source):
        t1 = time.perf_counter()
        frac = max(0.0, (step - warmup) / max(1, a.steps - warmup))
        lr = a.lr * (step + 1) / warmup if step < warmup else a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, parts = loss_fn(student(input_ids=x, attention_mask=mask).logits, x, mask, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        t2 = time.perf_counter()
        t_teacher += t1 - t0 if targets is not None else 0.0  # making (or reading) the batch and its targets
        t_student, tokens = t_student + t2 - t1, tokens + int(mask.sum())
        t0 = time.perf_counter()
        ces.append(float(parts["ce"]))
        if step < a.byte_batches and targets is not None:
            b, z, n, s = coded(targets, mask, run, vocab)
            byte_sum, blosc_sum, code_tokens, t_code = byte_sum + b, blosc_sum + z, code_tokens + n, t_code + s
    ppl = perplexity(student, held.input_ids, held.offsets)
    per = (lambda v: round(v / code_tokens, 1)) if code_tokens else (lambda v: "")
    return (run, round(ppl, 2), round(float(np.mean(ces[-10:])), 3), round(tokens / t_student),
            round(tokens / t_teacher) if t_teacher else "", round(code_tokens / t_code) if t_code else "",
            per(byte_sum), per(blosc_sum))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="a folder with train and heldout .txt or .jsonl")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--byte-batches", type=int, default=4, help="batches whose targets are coded for bytes/token")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkd_cache.models import quiet_transformers

    quiet_transformers()  # the library's own quieting of transformers' load reports
    if a.threads:
        torch.set_num_threads(a.threads)
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    for r in runs:
        parse_run(r)
    print(header())
    tok = AutoTokenizer.from_pretrained(a.teacher)
    train = tokenize_corpus(tok, load_corpus([str(corpus_file(a.data, "train"))]), a.seq, "pack")
    held = tokenize_corpus(tok, load_corpus([str(corpus_file(a.data, "heldout"))]), a.seq, "pack")
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    t0 = time.perf_counter()
    teacher_ppl = perplexity(teacher, held.input_ids, held.offsets)
    teacher.eval()
    print(f"teacher {a.teacher}: {teacher.config.num_hidden_layers} layers, vocab {vocab:,}, held-out perplexity "
          f"{teacher_ppl:.2f} ({held.num_tokens:,} tokens, {time.perf_counter() - t0:.1f}s); train "
          f"{train.summary(a.seq)}; students: {a.student_layers} layers, {a.steps} steps of {a.batch} x {a.seq}, "
          f"lr {a.lr}, alpha {a.alpha}, T {a.temperature}", flush=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [(f"teacher ({teacher.config.num_hidden_layers} layers)", round(teacher_ppl, 2), "", "", "", "", "", "")]
    for run in runs:
        t0 = time.perf_counter()
        rows.append(train_run(run, a, teacher, train, held, vocab, pad))
        print(f"{run}: {rows[-1]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(table(rows, ("run", "held-out ppl", "train CE (last 10)", "student tok/s", "teacher+targets tok/s",
                       "coding tok/s", "coded B/token", "Blosc zstd B/token")))


if __name__ == "__main__":
    main()
