"""Issue 18's experiment, step 1: a small causal-LM teacher trained from scratch on local text, on this CPU.

    python benchmarks/lm_teacher.py --out /work/lm [--corpus glue|python] [--minutes 25] [--vocab 4096] [--layers 6]

There is no pretrained causal LM offline, so this makes one:
- text, `--corpus glue` (the default): the sentences of ../shared/glue, one per line. Training: SST-2 train, MRPC
  train, RTE train, QNLI dev (about 1M tokens). Held out: SST-2 dev and RTE dev (sentences of neither are in
  training). Writes train.txt and heldout.txt.
- text, `--corpus python`: the source files of this Python's standard library (test packages left out), one
  document per file, in path order: every 25th file is held out (up to 200 KB of them), the others train (up to
  3.5 MB, about the size of the GLUE text). Code is far more predictable than short sentences: the teacher's
  next-token distributions are peakier, as a real LM's are, and a sample:N target has fewer distinct ids.
  Writes train.jsonl and heldout.jsonl (a "text" field per file).
- a byte-level BPE tokenizer of `--vocab` tokens trained with `tokenizers` on the training text, saved as a
  `transformers` fast tokenizer with `<|endoftext|>` as its eos (and bos, pad, unk);
- a GPT-2 shaped model (`--layers` x `--hidden`, context `--seq`) trained with AdamW (cosine schedule, warm-up)
  on the training text packed into `--seq`-token sequences (pkd_cache/data/corpus.py, mode "pack"), for
  `--minutes` of wall time; held-out perplexity every `--eval-every` steps and at the end.
Writes `<out>/data/{train,heldout}.txt` and `<out>/teacher/` (model and tokenizer, `AutoModelForCausalLM`-loadable),
and prints a table. Reproducible up to the wall-clock budget (seed 0).
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import GLUE, header, table

from pkd_cache.commands.evaluate_lm import perplexity as scored_perplexity
from pkd_cache.data.corpus import load_corpus, token_budget_batches, tokenize_corpus

EOS = "<|endoftext|>"


def glue_sentences(name: str, split: str, columns: tuple[str, ...]) -> list[str]:
    with open(GLUE / name / f"{split}.tsv", encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [" ".join(r[c].split()) for r in rows for c in columns if r.get(c) and r[c].strip()]


def write_text(out: Path, corpus: str) -> tuple[Path, Path]:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if corpus == "python":
        return write_python_source(data)
    train = (glue_sentences("SST-2", "train", ("sentence",)) + glue_sentences("MRPC", "train", ("#1 String", "#2 String"))
             + glue_sentences("RTE", "train", ("sentence1", "sentence2"))
             + glue_sentences("QNLI", "dev", ("question", "sentence")))
    heldout = glue_sentences("SST-2", "dev", ("sentence",)) + glue_sentences("RTE", "dev", ("sentence1", "sentence2"))
    (data / "train.txt").write_text("\n".join(train) + "\n")
    (data / "heldout.txt").write_text("\n".join(heldout) + "\n")
    return data / "train.txt", data / "heldout.txt"


def write_python_source(data: Path, train_bytes: int = 3_500_000, heldout_bytes: int = 200_000) -> tuple[Path, Path]:
    import json
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not ({"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(p.relative_to(root).parts)))
    parts = {"train": [], "heldout": []}
    size = {"train": 0, "heldout": 0}
    limit = {"train": train_bytes, "heldout": heldout_bytes}
    for i, path in enumerate(files):
        split = "heldout" if i % 25 == 0 else "train"
        text = path.read_text(encoding="utf-8", errors="replace")
        if size[split] + len(text) <= limit[split] and text.strip():
            parts[split].append(json.dumps({"text": text}))
            size[split] += len(text)
    for split, lines in parts.items():
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"python source from {root}: {len(parts['train'])} files ({size['train']:,} chars) to train, "
          f"{len(parts['heldout'])} ({size['heldout']:,}) held out", flush=True)
    return data / "train.jsonl", data / "heldout.jsonl"


def train_tokenizer(train_txt: Path, vocab: int, folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    if train_txt.suffix == ".txt":
        bpe.train([str(train_txt)], vocab_size=vocab, min_frequency=2, special_tokens=[EOS])
    else:  # documents that span lines (source files): the text of each, not the file's JSON
        bpe.train_from_iterator(load_corpus([str(train_txt)]).documents, vocab_size=vocab, min_frequency=2,
                                special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
    tok.save_pretrained(folder)
    return tok


def perplexity(model, ids: np.ndarray, offsets: np.ndarray) -> float:
    """Held-out perplexity as `pkd-cache eval --task lm` scores it (each position t on token t + 1)."""
    return scored_perplexity(model, ids, offsets)[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--corpus", choices=("glue", "python"), default="glue")
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200)
    a = p.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    print(header())
    train_txt, heldout_txt = write_text(a.out, a.corpus)
    t0 = time.perf_counter()
    tok = train_tokenizer(train_txt, a.vocab, a.out / "teacher")
    train = tokenize_corpus(tok, load_corpus([str(train_txt)]), a.seq, "pack")
    held = tokenize_corpus(tok, load_corpus([str(heldout_txt)]), a.seq, "pack")
    print(f"tokenizer: {len(tok):,} tokens in {time.perf_counter() - t0:.1f}s; train {train.summary(a.seq)}; "
          f"held out {held.num_tokens:,} tokens", flush=True)

    config = GPT2Config(vocab_size=len(tok), n_positions=a.seq, n_embd=a.hidden, n_layer=a.layers, n_head=a.heads,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget, warmup = a.minutes * 60, 100
    est_steps = None  # the cosine runs over the steps the budget allows, estimated after the warm-up
    rows, step, epoch, start = [], 0, 0, time.perf_counter()
    ids = torch.from_numpy(train.input_ids.astype(np.int64))
    done = False
    while not done:
        for batch in token_budget_batches(train.offsets, a.batch * a.seq, seed=0, epoch=epoch):
            seqs = [ids[train.offsets[i]:train.offsets[i + 1]] for i in batch]
            x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=tok.eos_token_id)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs],
                                                   batch_first=True)
            labels = x.masked_fill(mask == 0, -100)
            elapsed = time.perf_counter() - start
            if step == warmup:
                est_steps = int(step * budget / max(elapsed, 1e-9))
            frac = 0.0 if est_steps is None else min(1.0, (step - warmup) / max(1, est_steps - warmup))
            lr = a.lr * (step + 1) / warmup if step < warmup else a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step} epoch {epoch} loss {loss.item():.3f} lr {lr:.2e} {elapsed / 60:.1f} min",
                      flush=True)
            if step % a.eval_every == 0:
                rows.append((step, epoch, round(time.perf_counter() - start), round(loss.item(), 3),
                             round(perplexity(model, held.input_ids, held.offsets), 2)))
                print(rows[-1], flush=True)
            if time.perf_counter() - start > budget:
                done = True
                break
        else:
            epoch += 1
    seconds = time.perf_counter() - start
    ppl = perplexity(model, held.input_ids, held.offsets)
    rows.append((step, epoch, round(seconds), round(loss.item(), 3), round(ppl, 2)))
    model.save_pretrained(a.out / "teacher")
    print(table(rows, ("step", "epoch (from 0)", "seconds", "train loss", "held-out ppl")))
    print(f"teacher: {sum(p.numel() for p in model.parameters()):,} parameters, {a.layers} layers x {a.hidden}; "
          f"{step * a.batch * a.seq / seconds:,.0f} train tokens/s; held-out perplexity {ppl:.2f}; "
          f"saved to {a.out / 'teacher'}")


if __name__ == "__main__":
    main()
