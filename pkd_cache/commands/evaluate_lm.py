"""`pkd-cache eval --task lm`: a causal LM's perplexity on a held-out corpus (txt, jsonl, parquet or a hub dataset).

The corpus is packed into `--max-seq-length`-token sequences as run_clm.py's evaluation does (data/corpus.py,
mode "pack": documents joined with the eos token, the last short sequence kept), and every position t of a
sequence but the last is scored on token t + 1: perplexity = exp(total next-token NLL / tokens scored).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch

from ..config import EvalConfig
from ..data.corpus import load_corpus, tokenize_corpus
from ..progress import log, progress_bar
from ..student.causal_lm import load_causal_lm
from ..training import resolve_device
from .paths import save_eval_results


@torch.no_grad()
def perplexity(model, ids: np.ndarray, offsets: np.ndarray, batch_size: int = 32, device="cpu",
               progress: bool = False) -> tuple[float, int]:
    """(exp(mean next-token NLL), tokens scored) over the sequences `ids[offsets[i]:offsets[i + 1]]`."""
    was_training = model.training
    model.eval()
    seqs = [ids[offsets[i]:offsets[i + 1]].astype(np.int64) for i in range(len(offsets) - 1)]
    seqs = [s for s in seqs if len(s) >= 2]
    groups = [seqs[a:a + batch_size] for a in range(0, len(seqs), batch_size)]
    nll, count = 0.0, 0
    with progress_bar(len(groups), "scoring", unit="batch") if progress else contextlib.nullcontext() as bar:
        for group in groups:
            nll_b, count_b = _group_nll(model, group, device)
            nll, count = nll + nll_b, count + count_b
            if bar is not None:
                bar.advance(1)
    model.train(was_training)
    return math.exp(nll / max(count, 1)), count


def _group_nll(model, group: list, device) -> tuple[float, int]:
    """(summed next-token NLL, tokens scored) of a group of sequences, padded to the longest."""
    width = max(len(s) for s in group)
    x = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.bool)
    for i, s in enumerate(group):
        x[i, :len(s)], mask[i, :len(s)] = torch.from_numpy(s), True
    x, mask = x.to(device), mask.to(device)
    logits = model(input_ids=x, attention_mask=mask.long()).logits[:, :-1].float()
    keep = mask[:, 1:]  # position t is scored on token t + 1: both real
    nll = float(torch.nn.functional.cross_entropy(logits[keep], x[:, 1:][keep], reduction="sum"))
    return nll, int(keep.sum())


def evaluate_lm(config: EvalConfig) -> dict[str, float]:
    from transformers import AutoTokenizer

    corpus = load_corpus(config.data_files or [], config.text_column, config.max_examples)  # bad data fails first
    model = load_causal_lm(config.model)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    max_len = config.max_seq_length or min(int(positions), 1024)
    tokens = tokenize_corpus(tokenizer, corpus, max_len, "pack")
    log(f"eval: {len(corpus):,} documents, {tokens.summary(max_len)}")
    device = resolve_device(config.device)
    ppl, scored = perplexity(model.to(device), tokens.input_ids, tokens.offsets, config.batch_size, device,
                             progress=True)
    metrics = {"perplexity": ppl, "loss": math.log(ppl), "tokens": scored}
    saved = save_eval_results(Path(config.model).expanduser(), {"task": "lm", **metrics})
    log(f"wrote {saved}" if saved else f"scores not written: {config.model} is not a folder pkd-cache wrote "
        f"(its scores are printed only)")
    return metrics
