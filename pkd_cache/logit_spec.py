"""What a token store keeps of the teacher's next-token distribution: `--logits sample:N | topk:K | none`.

    sample:N   N i.i.d. draws per position from softmax(teacher logits / T), kept as unique ids and their counts
               (RS-KD, Anshumann et al. 2025): an unbiased estimate of the distribution (docs/TOKEN_KD.md)
    topk:K     the K largest log-probabilities, with their ids; the mass left outside them is their complement
    none       no logits (hidden states only, or tokens for a CE-only student)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PkdCacheError

KINDS = ("sample", "topk", "none")
_SPEC = re.compile(r"^(sample|topk):([0-9]+)$|^none$")


@dataclass(frozen=True)
class LogitSpec:
    kind: str  # sample | topk | none
    count: int = 0  # N draws or K ids (0 for none)

    @classmethod
    def parse(cls, text: str, flag: str = "--logits") -> "LogitSpec":
        m = _SPEC.match(str(text).strip())
        if m is None:
            raise PkdCacheError(f"{flag} {text!r} is not one of sample:N, topk:K or none (e.g. sample:64)")
        if m.group(1) is None:
            return cls("none")
        return cls(m.group(1), int(m.group(2)))

    def check(self, vocab_size: int, flag: str = "--logits") -> None:
        """K or N must lie in [1, vocab] (more draws than the vocabulary is allowed for sample: ids repeat, but the
        issue's bound keeps the coded counts small; more top-k ids than the vocabulary holds is impossible)."""
        if self.kind != "none" and not 1 <= self.count <= vocab_size:
            what = "N" if self.kind == "sample" else "K"
            raise PkdCacheError(f"{flag} {self}: {what} must be in [1, {vocab_size:,}] (the teacher's vocabulary)")

    @property
    def parts(self) -> int:
        """How many coded byte streams a row of targets has (store/token_targets.py)."""
        return {"sample": 3, "topk": 2, "none": 0}[self.kind]

    def __str__(self) -> str:
        return self.kind if self.kind == "none" else f"{self.kind}:{self.count}"
