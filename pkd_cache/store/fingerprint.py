"""Fingerprints (sha256 hex) of what a store was made from: the teacher's weights and the tokenizer's vocabulary."""
from __future__ import annotations

import hashlib
import json

import torch


def weights_fingerprint(model: torch.nn.Module, prefix: str = "") -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of the state dict, in name order (only the names
    that start with `prefix`: the base model without a freshly initialised head, say)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not name.startswith(prefix):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary as JSON `[[token, id], ...]` sorted by id: the ids in a store mean these tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
