"""Issue 18's speed goals for token stores, measured side by side in one run:

  dump     `pkd_cache.dump --task lm` (teacher forward + sample:N draws + coding + writing, the loop's wall time as
           the store records it, `dump_seconds`) against the bare teacher forward over the same batches of the same
           sequences (no_grad, nothing kept): goal >= 0.95 of its tokens/s.
  distill  `pkd_cache.distill` from that store (CE + alpha x RS-KD, targets read and decoded) against the same command
           with --alpha 0 (a CE-only student through the same reader, targets left unread), and against a CE-only
           loop on token batches already in memory (no store at all): goal >= 0.95 of CE-only training speed.
           Where the gap is: the same KD loop on batches in memory against the CE-only one (the loss's cost), and
           the reader alone with and without decoding the targets (batches/s, on the calling thread).
           Each is timed by the training loop's own wall time (`wall_seconds` of metrics.json: the steps and the
           evaluation on the small validation split).

    python benchmarks/bench_lm_store.py --teacher /work/lm/teacher --data /work/lm/data [--documents 20000]
        [--logits sample:64] [--seq 128] [--batch 32] [--steps 60] [--repeats 2] [--dump-only | --pieces]
        [--whole-forward] [--read-only] [--device cpu|cuda] [--random-teacher 12x768 [--vocab 32768]]

Alternating repeats; the table gives each one and the ratio of the medians. With sample:N, each repeat also dumps
with the torch sampler (the fallback where teacher/_sampler.c was not built), and with --whole-forward the dump
before teacher/lm_head.py. Run it alone on the machine. Everything (the bare forward and the in-memory CE loop too)
runs on --device, cuda where there is one; on a GPU the dump draws sample:N there in torch, so the compiled sampler's
extra dumps are skipped, and the in-memory CE loop's batches are on the GPU before its clock starts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from common import header, synchronize, table

import pkd_cache
from pkd_cache.commands import dump_lm
from pkd_cache.commands.dump_lm_rows import teacher_batches
from pkd_cache.data.corpus import load_corpus, tokenize_corpus
from pkd_cache.store.token_stream import iter_token_batches
from pkd_cache.teacher import token_targets
from pkd_cache.student.causal_lm import TokenKD, causal_lm_student


@torch.no_grad()
def bare_forward(model, tok, batch: int, device: torch.device) -> float:
    """Tokens/s of the teacher's forward alone over the dump's batches."""
    ids = tok.input_ids.astype(np.int64)
    synchronize(device)
    t0 = time.perf_counter()
    for a, b in teacher_batches(tok.offsets, batch):
        lengths = np.diff(tok.offsets[a:b + 1])
        width = int(lengths.max())
        real = np.arange(width)[None, :] < lengths[:, None]
        x = np.zeros(real.shape, np.int64)
        x[real] = ids[tok.offsets[a]:tok.offsets[b]]
        model(input_ids=torch.from_numpy(x).to(device),
              attention_mask=torch.from_numpy(real.astype(np.int64)).to(device))
    synchronize(device)
    return tok.num_tokens / (time.perf_counter() - t0)


def dump(a, out: Path, train: Path, held: Path) -> float:
    store = pkd_cache.dump(pkd_cache.DumpConfig(
        teacher=str(a.teacher), task="lm", data_files=[str(train)], validation_files=[str(held)], out=str(out),
        max_seq_length=a.seq, batch_size=a.batch, logits=a.logits, overwrite=True, device=a.device))
    info = store.info()
    tokens = sum(s["num_tokens"] for s in info["splits"].values())
    return tokens / info["dump_seconds"]


def distill(a, store: Path, out: Path, alpha: float) -> float:
    pkd_cache.distill(pkd_cache.DistillConfig(
        store=str(store), output_dir=str(out), student_layers=a.student_layers, alpha=alpha, overwrite=True,
        device=a.device,
        train=pkd_cache.TrainConfig(max_steps=a.steps, batch_size=a.batch, learning_rate=5e-4, logging_steps=0,
                                    eval_strategy="no")))
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["steps"] / metrics["wall_seconds"]


def in_memory(a, store: Path, alpha: float) -> float:
    """Steps/s of a student on the same token batches, materialised in memory (on --device) before the clock starts:
    CE only (alpha 0, no targets read), or CE + alpha x RS-KD on the stored targets. The optimiser is distill's
    (fused AdamW)."""
    device = torch.device(a.device)
    opened = pkd_cache.open_store(str(store))
    batches = [{k: v.to(device) for k, v in b.items()} for _, b in
               zip(range(a.steps), iter_token_batches(opened, "train", a.batch * a.seq, targets=alpha > 0))]
    torch.manual_seed(0)
    model = causal_lm_student(str(a.teacher), a.student_layers).to(device)
    loss_fn = TokenKD("sample", alpha=alpha)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=True)
    synchronize(device)
    t0 = time.perf_counter()
    for b in batches:
        targets = (b["target_ids"], b["target_counts"]) if alpha > 0 else None
        loss, _ = loss_fn(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                          b["input_ids"], b["attention_mask"], targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    synchronize(device)
    return len(batches) / (time.perf_counter() - t0)


def read_alone(a, store: Path, targets: bool, workers=None, compiled: bool = True) -> float:
    """Batches/s of the store's reader alone over distill's first `a.steps` batches, gathered on the caller's
    thread from rows decoded on `workers` threads (as distill's default; 0: on the caller's thread too), with the
    compiled decoder or (compiled False) the numpy one."""
    from pkd_cache.store import sparse_codec

    opened = pkd_cache.open_store(str(store))
    with contextlib.nullcontext() if compiled else mock.patch.object(sparse_codec, "_rice_rows", None):
        t0 = time.perf_counter()
        n = sum(1 for _, b in zip(range(a.steps), iter_token_batches(opened, "train", a.batch * a.seq, prefetch=0,
                                                                       targets=targets, workers=workers)))
        return n / (time.perf_counter() - t0)


def reader_rows(a, store: Path) -> list[tuple]:
    """The reader alone, alternating: with and without targets, decoded in C or numpy, on a pool or one thread."""
    cases = {"no targets": dict(targets=False), "targets, C, pool (distill's default)": dict(targets=True),
             "targets, C, one thread": dict(targets=True, workers=0),
             "targets, numpy, one thread": dict(targets=True, workers=0, compiled=False)}
    runs = {k: [] for k in cases}
    for _ in range(a.repeats):
        for k, kw in cases.items():
            runs[k].append(read_alone(a, store, **kw))
    base = statistics.median(runs["targets, numpy, one thread"])
    return [(k, ", ".join(f"{v:.1f}" for v in r), f"{1e3 / statistics.median(r):.1f}",
             f"{statistics.median(r) / base:.2f}") for k, r in runs.items()]


def pieces(a, teacher, tok) -> list[tuple]:
    """The dump's per-batch steps after the forward, on one batch of the teacher's real logits, compiled against the
    numpy / torch fallbacks, alternating: (step, implementation, ms of wall, ms of CPU), medians of `a.repeats * 5`."""
    from pkd_cache.logit_spec import LogitSpec
    from pkd_cache.store import sparse_codec
    from pkd_cache.store.token_targets import encode_row, slot_bytes

    a0, b0 = teacher_batches(tok.offsets, a.batch)[0]
    lengths = np.diff(tok.offsets[a0:b0 + 1])
    real = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
    ids = np.zeros(real.shape, np.int64)
    ids[real] = tok.input_ids[tok.offsets[a0]:tok.offsets[b0]]
    with torch.no_grad():  # the steps timed here are the CPU's: the logits come back to it
        logits = teacher(input_ids=torch.from_numpy(ids).to(a.device)).logits.cpu()
    logits = logits[torch.from_numpy(real)]  # [tokens, V]
    spec, vocab, n = LogitSpec.parse(a.logits), logits.shape[-1], int(a.logits.split(":")[1])
    first, second = (t.numpy() for t in token_targets.seeded_sample_targets(logits, n, 0, 0))
    slot = slot_bytes(spec, vocab, len(logits))
    steps = {("sample:N draws", "compiled (teacher/_sampler.c)"): lambda: token_targets.seeded_sample_targets(logits, n, 0, 0),
             ("sample:N draws", "torch"): lambda: token_targets.seeded_sample_targets(logits, n, 0, 0),
             ("coding a row (encode_row)", "compiled (store/_bits.c)"): lambda: encode_row(spec, first, second, vocab, slot),
             ("coding a row (encode_row)", "numpy"): lambda: encode_row(spec, first, second, vocab, slot)}
    off = {"torch": (token_targets, "_sample_rows"), "numpy": (sparse_codec, "_pack_codes")}
    times = {k: ([], []) for k in steps}
    for _ in range(a.repeats * 5):
        for (step, impl), fn in steps.items():
            with mock.patch.object(*off[impl], None) if impl in off else contextlib.nullcontext():
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[step, impl][0].append(time.perf_counter() - w0), times[step, impl][1].append(time.process_time() - c0)
    return [(step, impl, len(logits), f"{statistics.median(w) * 1e3:.1f}", f"{statistics.median(c) * 1e3:.1f}")
            for (step, impl), (w, c) in times.items()]


def random_teacher(base: Path, shape: str, out: Path, vocab: int | None = None, positions: int | None = None) -> Path:
    """A GPT-2 of `shape` (LAYERSxWIDTH) with random weights and `base`'s tokenizer, and its vocabulary and positions
    unless `vocab` / `positions` are given (the tokenizer's ids must stay below `vocab`)."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(base)
    if vocab is not None and len(tokenizer) > vocab:
        raise SystemExit(f"--vocab {vocab} is smaller than the tokenizer's {len(tokenizer)} ids: give at least that")
    layers, width = (int(v) for v in shape.lower().split("x"))
    config = AutoConfig.from_pretrained(base)
    config.n_layer, config.n_embd, config.n_head = layers, width, max(1, width // 64)
    config.vocab_size, config.n_positions = vocab or config.vocab_size, max(positions or 0, config.n_positions)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="a folder with train.txt and heldout.txt")
    p.add_argument("--documents", type=int, default=20000, help="the first N lines of train.txt")
    p.add_argument("--logits", default="sample:64")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--random-teacher", default=None, help="LAYERSxWIDTH, e.g. 12x768: a randomly initialised GPT-2 "
                   "of that shape with --teacher's vocabulary and tokenizer instead (speed does not depend on the "
                   "weights; its sample:N targets are near-uniform, the reader's worst case)")
    p.add_argument("--vocab", type=int, default=None, help="with --random-teacher: its vocabulary size (default "
                   "--teacher's; at least the tokenizer's), e.g. 32768 for an LM head of a GPU-sized teacher")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the teacher, the dump and the students run (default: cuda if any)")
    p.add_argument("--dump-only", action="store_true", help="measure the dump alone")
    p.add_argument("--distill-only", action="store_true", help="measure distilling alone, against --alpha 0 (one "
                   "untimed dump makes the store)")
    p.add_argument("--read-only", action="store_true", help="only time the reader of distill's batches (one untimed "
                   "dump makes the store): with and without targets, the compiled or numpy decoder, a pool or not")
    p.add_argument("--pieces", action="store_true", help="only time the dump's steps after the forward (sampling, "
                   "coding) on one batch, compiled against the fallbacks")
    p.add_argument("--whole-forward", action="store_true", help="each repeat also dumps with the model's whole "
                   "forward (all of a batch's logits at once) instead of the LM head a block of positions at a time")
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkd_cache.models import quiet_transformers

    quiet_transformers()
    print(header())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train, held = tmp / "train.txt", tmp / "heldout.txt"
        lines = (a.data / "train.txt").read_text().splitlines()
        train.write_text("\n".join(lines[:a.documents]) + "\n")
        held.write_text("\n".join((a.data / "heldout.txt").read_text().splitlines()[:200]) + "\n")
        if a.random_teacher:
            a.teacher = random_teacher(a.teacher, a.random_teacher, tmp / "random-teacher", a.vocab)
        device = torch.device(a.device)
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(a.teacher)
        toks = [tokenize_corpus(tokenizer, load_corpus([str(f)]), a.seq, "pack") for f in (train, held)]
        print(f"{toks[0].num_tokens + toks[1].num_tokens:,} tokens ({a.documents:,} documents + 200 held out), "
              f"sequences of {a.seq}, teacher batches of {a.batch}, {a.logits}; students: {a.student_layers} layers, "
              f"{a.steps} steps of <= {a.batch * a.seq:,} tokens; on {device}", flush=True)
        if a.pieces:
            print(table(pieces(a, teacher, toks[0]), ("step", "implementation", "tokens", "wall ms (median)",
                                                       "CPU ms (median)")))
            return
        bare, dumped, torch_sampled, whole, kd, ce, memory, kd_memory, reads = [], [], [], [], [], [], [], [], []
        store = tmp / "store.zarr"
        # the compiled sampler draws from CPU logits only: on a GPU the dump draws in torch there
        compiled = a.logits.startswith("sample") and token_targets._sample_rows is not None and device.type == "cpu"
        if a.distill_only or a.read_only:  # one dump makes the store; nothing of it is timed
            dump(a, store, train, held)
        if a.read_only:
            print(table(reader_rows(a, store), ("the reader alone", "batches/s", "ms a batch (median)",
                                                "against numpy, one thread")))
            return
        for r in range(0 if a.distill_only else a.repeats):
            bare.append(sum(t.num_tokens for t in toks) / sum(t.num_tokens / bare_forward(teacher, t, a.batch, device)
                                                              for t in toks))
            dumped.append(dump(a, store, train, held))
            print(f"repeat {r + 1}: bare forward {bare[-1]:,.0f} tok/s, dump {dumped[-1]:,.0f} tok/s", flush=True)
            if compiled:  # the same dump with the torch sampler that runs where teacher/_sampler.c was not built
                with mock.patch.object(token_targets, "_sample_rows", None):
                    torch_sampled.append(dump(a, store, train, held))
                print(f"repeat {r + 1}: dump with the torch sampler {torch_sampled[-1]:,.0f} tok/s", flush=True)
            if a.whole_forward:  # the dump before teacher/lm_head.py: the model's whole forward, all logits at once
                with mock.patch.object(dump_lm, "split_head", lambda *args: None):
                    whole.append(dump(a, store, train, held))
                print(f"repeat {r + 1}: dump with the whole forward {whole[-1]:,.0f} tok/s", flush=True)
        for r in range(0 if a.dump_only else a.repeats):
            # the first run of a process pays warm-ups: the KD and CE runs take turns at going first
            for alpha in ((0.5, 0.0) if r % 2 == 0 else (0.0, 0.5)):
                (kd if alpha else ce).append(distill(a, store, tmp / ("kd" if alpha else "ce"), alpha))
            if not a.distill_only:
                for alpha in ((0.0, 0.5) if r % 2 == 0 else (0.5, 0.0)):
                    (kd_memory if alpha else memory).append(in_memory(a, store, alpha))
                reads.append((read_alone(a, store, True), read_alone(a, store, False)))
            print(f"repeat {r + 1}: distill {kd[-1]:.3f} step/s, --alpha 0 {ce[-1]:.3f}"
                  + (f"; in memory: KD {kd_memory[-1]:.3f}, CE only {memory[-1]:.3f}; the reader alone "
                     f"{reads[-1][0]:.1f} batches/s with targets, {reads[-1][1]:.1f} without" if memory else ""),
                  flush=True)
    med = statistics.median
    def pairs(xs):  # each dump against the bare forward run just before it: the VM drifts between repeats
        return f"{med(x / b for x, b in zip(xs, bare)):.3f}"

    rows = []
    if dumped:
        rows.append(("dump --task lm (tok/s)", ", ".join(f"{v:,.0f}" for v in dumped), "bare teacher forward",
                     ", ".join(f"{v:,.0f}" for v in bare), f"{med(dumped) / med(bare):.3f}", pairs(dumped)))
    if torch_sampled:
        rows.append(("dump --task lm, torch sampler (tok/s)", ", ".join(f"{v:,.0f}" for v in torch_sampled),
                     "bare teacher forward", ", ".join(f"{v:,.0f}" for v in bare), f"{med(torch_sampled) / med(bare):.3f}",
                     pairs(torch_sampled)))
    if whole:
        rows.append(("dump --task lm, whole forward (tok/s)", ", ".join(f"{v:,.0f}" for v in whole),
                     "bare teacher forward", ", ".join(f"{v:,.0f}" for v in bare), f"{med(whole) / med(bare):.3f}",
                     pairs(whole)))
    if not a.dump_only:
        rows += [
            ("distill, alpha 0.5 (step/s)", ", ".join(f"{v:.3f}" for v in kd), "distill --alpha 0 (CE only)",
             ", ".join(f"{v:.3f}" for v in ce), f"{med(kd) / med(ce):.3f}",
             f"{med(k / c for k, c in zip(kd, ce)):.3f}")]
        if memory:
            runs = lambda xs: ", ".join(f"{v:.3f}" for v in xs)  # noqa: E731
            rows += [("distill, alpha 0.5 (step/s)", runs(kd), "CE-only loop, batches in memory", runs(memory),
                      f"{med(kd) / med(memory):.3f}", ""),
                     ("KD loop, batches in memory (step/s)", runs(kd_memory), "CE-only loop, batches in memory",
                      runs(memory), f"{med(kd_memory) / med(memory):.3f}",
                      f"{med(k / c for k, c in zip(kd_memory, memory)):.3f}"),
                     ("the reader alone, targets decoded (batches/s)", runs(r for r, _ in reads),
                      "the reader alone, no targets", runs(n for _, n in reads),
                      f"{med(r for r, _ in reads) / med(n for _, n in reads):.3f}", "")]
    print(table(rows, ("measured", "runs", "against", "runs", "ratio of medians", "median of pair ratios")))


if __name__ == "__main__":
    main()
