"""Encoder students on a token store's hidden states (TinyBERT-style general distillation, issue 18).

A token store dumped from an encoder (BERT, RoBERTa, ...) with `--logits none --hidden-layers ...` holds the
teacher's hidden state of every token of the chosen layers. An encoder student, the embeddings and first k layers of
`AutoModel` (no head), learns from them with the same per-token `HiddenStateMSE` as a causal-LM student, on the same
token-budget batches, with no teacher in memory. What it learns is the teacher's representation, not a task: fine-tune
or distil it on a task afterwards (TinyBERT's second stage).
"""
from __future__ import annotations

from ..errors import PkdCacheError, first_line
from ..models import load_config


def model_kind(config) -> str:
    """"causal-lm" (decoder-only: `AutoModelForCausalLM`), "encoder" (bidirectional: BERT and its kin) or "other"
    (encoder-decoder, vision, ...), from a transformers config."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        return "other"
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    return "causal-lm" if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "other"


def encoder_student(name_or_path: str, layers: int | None = None):
    """The embeddings and first `layers` layers of the encoder `name_or_path` as an `AutoModel` (no head; all
    layers when None), in train mode. transformers loads the first k layers' weights and drops the rest, as for a
    sentence-level student (student/init.py)."""
    from transformers import AutoModel

    config = load_config(name_or_path)
    if model_kind(config) != "encoder":
        raise PkdCacheError(f"{name_or_path} is a {getattr(config, 'model_type', '?')} model, not an encoder")
    available = getattr(config, "num_hidden_layers", None)
    if layers is not None and available is not None and not 1 <= layers <= available:
        raise PkdCacheError(f"--student-layers {layers}: {name_or_path} has {available} layers (use 1..{available})")
    try:
        model = AutoModel.from_pretrained(name_or_path, **({"num_hidden_layers": layers} if layers else {}))
    except Exception as e:
        raise PkdCacheError(f"could not load {name_or_path} as an encoder: {first_line(e)}") from e
    return model.train()


def load_encoder(name_or_path: str):
    """A teacher encoder (all its layers, eval mode), for `dump --task lm --logits none`."""
    return encoder_student(name_or_path).eval()
