"""Tokenising examples into fixed-width id arrays (the layout of the store) and padded torch batches."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import PkdCacheError
from ..store.format import TOKEN_DTYPES
from .loading import Examples

# storage dtypes of the token arrays (see docs/FORMAT.md)


def min_seq_length(tokenizer, pair: bool) -> int:
    """The shortest max length that keeps a token of each text besides the tokenizer's special tokens ([CLS] and
    [SEP]s for BERT: 3 for one sentence, 5 for a pair). Below it the texts vanish (the model would see only
    special tokens), and below the special tokens alone the tokenizer silently stops truncating."""
    return tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)


def check_seq_length(tokenizer, examples: Examples, max_length: int, flag: str = "--max-seq-length") -> None:
    """Refuse a `max_length` too short for these examples (one line naming `flag` and the minimum)."""
    pair = examples.text_b is not None
    need = min_seq_length(tokenizer, pair)
    if max_length < need:
        specials = tokenizer.num_special_tokens_to_add(pair=pair)
        what, text = ("sentence pair", "each text needs") if pair else ("sentence", "the text needs")
        raise PkdCacheError(f"{flag} {max_length} is too short: the tokenizer adds {specials} special tokens to "
                            f"each {what}, and {text} at least one more; use {flag} {need} or more")


def tokenize(tokenizer, examples: Examples, start: int, stop: int, max_length: int) -> dict[str, np.ndarray]:
    """Token arrays for examples[start:stop], padded to `max_length` (the store keeps a fixed width)."""
    check_seq_length(tokenizer, examples, max_length)  # callers check first; this keeps a bad width one line
    b = None if examples.text_b is None else examples.text_b[start:stop]
    enc = tokenizer(examples.text_a[start:stop], b, truncation=True, max_length=max_length,
                    padding="max_length", return_token_type_ids=True, return_attention_mask=True)
    return {k: np.asarray(enc[k], dtype=dt) for k, dt in TOKEN_DTYPES.items()}


def tokenize_lengths(tokenizer, examples: Examples, max_length: int, block: int = 4096) -> np.ndarray:
    """Every example's token count after truncation (what length bucketing sorts by), `block` examples at a time
    so that the tokenizer's per-example objects never exist for a whole split at once."""
    lengths = []
    for a in range(0, len(examples), block):
        b = None if examples.text_b is None else examples.text_b[a:a + block]
        enc = tokenizer(examples.text_a[a:a + block], b, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)
        lengths += [len(ids) for ids in enc["input_ids"]]
    return np.array(lengths, dtype=np.int64)


def to_model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The model's keyword arguments from a batch, as int64 on `device`."""
    return {k: batch[k].to(device=device, dtype=torch.long, non_blocking=True) for k in TOKEN_DTYPES}
