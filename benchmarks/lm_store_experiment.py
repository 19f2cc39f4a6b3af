"""Issue 18's experiment, from stores: dump the teacher of lm_teacher.py once per kind of sparse target with
`pkd_cache.dump --task lm`, then distil one student per run from what the stores hold (no teacher in memory for
the sparse runs), all with the same init, seed, batches and steps.

    python benchmarks/lm_store_experiment.py --teacher /work/lm/teacher --data /work/lm/data --stores /work/lm/stores \\
        [--runs ce,full,topk:12,topk:64,sample:12,sample:64] [--steps 400] [--batch 32] [--seq 64] [--lr 5e-4]

Every run trains on the token-budget batches of one store (`pkd_cache.store.token_stream`, seeded by --seed): the
sparse runs take their targets from their own store (the same sequences in the same order: the stores differ only
in their targets); "ce" takes none, and "full" (online full-logit KD, the reference) runs the teacher on each batch.
The student and its training are lm_experiment.py's (`train_run`): the teacher's first --student-layers blocks,
AdamW, warm-up then cosine, loss CE + alpha x KD (TokenKD). Reported per run: held-out perplexity, train CE of the
last 10 steps, the student's tokens/s, tokens/s of making (full: the teacher online) or reading (a store) the
batches, the dump's tokens/s (teacher + targets + coding + writing, its own `dump_seconds`) and the targets' bytes
per token on disk (the store's checksum manifest). Speeds are wall-clock, with whatever else runs on the machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import corpus_file, header, table
from lm_experiment import RUNS, online_targets, parse_run, train_run
from lm_teacher import perplexity

import pkd_cache
from pkd_cache.data.corpus import load_corpus, tokenize_corpus
from pkd_cache.store.token_stream import iter_token_batches


def dump(a, spec: str) -> tuple:
    """The store of `spec` (dumped unless it is there already: the cache key says so), its dump tokens/s and its
    targets' bytes per token on disk."""
    out = a.stores / f"{spec.replace(':', '-')}.zarr"
    store = pkd_cache.dump(pkd_cache.DumpConfig(
        teacher=str(a.teacher), task="lm", data_files=[str(corpus_file(a.data, "train"))], out=str(out),
        max_seq_length=a.seq, batch_size=a.dump_batch, logits=spec, sample_seed=a.seed, temperature=a.temperature))
    info = store.info()
    tokens = info["splits"]["train"]["num_tokens"]
    chunks = json.loads((out / "checksums.json").read_text())["chunks"]
    target_bytes = sum(n for k, (n, _) in chunks.items() if k.split("/")[1] in ("targets", "target_bytes"))
    return store, round(tokens / info["dump_seconds"]), round(target_bytes / tokens, 1)


@torch.no_grad()
def mean_entropy(model, ids, offsets, sequences: int = 64) -> float:
    """The teacher's mean next-token entropy (nats) over the positions of `sequences` held-out sequences spread
    evenly over the file: how peaked its distributions are, which sets how many distinct ids N draws give."""
    total, count = 0.0, 0
    for i in sorted(set(np.linspace(0, len(offsets) - 2, sequences).astype(int).tolist())):
        x = torch.from_numpy(ids[offsets[i]:offsets[i + 1]].astype("int64"))[None]
        logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
        total, count = total - float((logp.exp() * logp).sum()), count + x.shape[1]
    return total / max(count, 1)


def store_source(a, store, run: str, teacher):
    """(input_ids, attention_mask, targets) of the first --steps batches of `store` (epochs as needed)."""
    name, _ = parse_run(run)
    n, epoch = 0, 0
    while True:
        for b in iter_token_batches(store, "train", a.batch * a.seq, seed=a.seed, epoch=epoch,
                                    targets=name in ("topk", "sample")):
            x, mask = b["input_ids"], b["attention_mask"]
            if name == "full":
                targets = online_targets(teacher, x, mask, run, torch.Generator(), a.temperature)
            elif name == "ce":
                targets = None
            else:
                targets = (b["target_ids"], b["target_counts" if name == "sample" else "target_logprobs"])
            yield x, mask, targets
            n += 1
            if n == a.steps:
                return
        epoch += 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="a folder with train and heldout .txt or .jsonl")
    p.add_argument("--stores", type=Path, required=True, help="where the stores are dumped (kept: a re-run reuses)")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dump-batch", type=int, default=64, help="sequences per teacher forward of the dumps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.byte_batches = 0  # train_run's own coding of targets: the stores' bytes on disk are reported instead
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkd_cache.models import quiet_transformers

    quiet_transformers()
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    specs = [r for r in runs if parse_run(r)[0] in ("topk", "sample")]
    if not specs:
        raise SystemExit("--runs needs at least one topk:K or sample:N run (its store gives every run's batches)")
    print(header())
    a.stores.mkdir(parents=True, exist_ok=True)
    stores = {}
    for spec in specs:
        t0 = time.perf_counter()
        stores[spec] = dump(a, spec)
        print(f"store {spec}: {stores[spec][1]:,} tok/s dumped, {stores[spec][2]} B/token of targets "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    tok = AutoTokenizer.from_pretrained(a.teacher)
    held = tokenize_corpus(tok, load_corpus([str(corpus_file(a.data, "heldout"))]), a.seq, "pack")
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher).eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    print(f"teacher {a.teacher}: held-out perplexity {perplexity(teacher, held.input_ids, held.offsets):.2f}, "
          f"mean entropy {mean_entropy(teacher, held.input_ids, held.offsets):.2f} nats; "
          f"students: {a.student_layers} layers, {a.steps} steps of <= {a.batch * a.seq:,} tokens, lr {a.lr}, "
          f"alpha {a.alpha}, T {a.temperature}", flush=True)
    rows = []
    for run in runs:
        store, dump_speed, size = stores.get(run, (stores[specs[0]][0], "", ""))
        t0 = time.perf_counter()
        r = train_run(run, a, teacher, None, held, vocab, 0, store_source(a, store, run, teacher))
        rows.append(r[:5] + (dump_speed, size))
        print(f"{run}: {rows[-1]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(table(rows, ("run", "held-out ppl", "train CE (last 10)", "student tok/s", "batch making/reading tok/s",
                       "dump tok/s", "targets B/token on disk")))


if __name__ == "__main__":
    main()
