"""The tokenised examples: N x S, padded to `max_seq_length` with the tokenizer's pad id."""
from __future__ import annotations

from .kind import ArrayKind, Dims, outlier, unsigned_max


def _tokens(d: Dims) -> tuple[int, int]:
    return (d.n, d.seq_len)


def _vocab(v, meta):
    vocab = meta.tokenizer.vocab_size
    return f"holds token ids outside the vocabulary [0, {vocab}) (e.g. {outlier(v)})" if unsigned_max(v) >= vocab \
        else None


def _mask(v, meta):
    return "holds attention mask values other than 0/1" if unsigned_max(v) > 1 else None


def _types(v, meta):
    types = meta.teacher.config.get("type_vocab_size")
    if isinstance(types, int) and not isinstance(types, bool) and types >= 1 and unsigned_max(v) >= types:
        return f"holds token type ids outside [0, {types})"
    return None


KINDS = (
    ArrayKind("input_ids", 0, _tokens, "int32", token=True, check=_vocab),
    ArrayKind("attention_mask", 1, _tokens, "uint8", token=True, check=_mask),  # 1 for real tokens
    ArrayKind("token_type_ids", 2, _tokens, "uint8", token=True, check=_types),  # segment ids
)
