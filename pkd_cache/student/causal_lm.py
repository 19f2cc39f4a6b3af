"""Causal-LM students (issue 18): the first k blocks of a pretrained `AutoModelForCausalLM`, and their token loss.

`causal_lm_student` mirrors `student/init.py`'s `build_student` for BERT: embeddings + first k blocks (+ final norm
and LM head here, which a causal LM keeps: the logits are over the teacher's vocabulary). `TokenKD` is the training
loss: next-token CE + alpha x KD on the teacher's (dense or sparse) targets, causally aligned as docs/TOKEN_KD.md
says. `HiddenStateMSE` is the optional per-token hidden-state loss on mapped layers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import PkdCacheError, first_line
from .gathered_nll import gathered_nll
from .sparse_kd import FullKDLoss, SampledKDLoss, TopKKDLoss

BLOCK_LISTS = ("transformer.h", "model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.layers")
KINDS = {"full": FullKDLoss, "sample": SampledKDLoss, "topk": TopKKDLoss}


def find_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """(dotted path, ModuleList) of the model's transformer blocks: GPT-2 `transformer.h`, Llama/Qwen/Mistral
    `model.layers`, OPT `model.decoder.layers`, GPT-NeoX `gpt_neox.layers`; anything else is a one-line error."""
    for path in BLOCK_LISTS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return path, obj
    raise PkdCacheError(f"cannot find the list of transformer blocks of a {type(model).__name__} "
                        f"(looked for {', '.join(BLOCK_LISTS)}); pass --student-layers only for those architectures")


def _check_causal(config, name: str) -> None:
    from .encoder import model_kind

    if model_kind(config) != "causal-lm":
        raise PkdCacheError(f"{name} is a {getattr(config, 'model_type', '?')} model, not a causal LM (decoder-only, "
                            f"AutoModelForCausalLM): --task lm needs one")


def load_causal_lm(name_or_path: str, config_overrides: Optional[dict] = None, pretrained: bool = True):
    """An `AutoModelForCausalLM` from a folder or hub name (or a random init from its config with
    `pretrained=False`); anything that is not a causal LM, or does not load, is one line."""
    from transformers import AutoModelForCausalLM

    from ..models import load_config

    config = load_config(name_or_path, **(config_overrides or {}))
    _check_causal(config, name_or_path)
    try:
        return (AutoModelForCausalLM.from_pretrained(name_or_path, config=config) if pretrained
                else AutoModelForCausalLM.from_config(config))
    except Exception as e:
        raise PkdCacheError(f"could not load {name_or_path} as a causal LM: {first_line(e)}") from e


def causal_lm_student(name_or_path: str, layers: Optional[int] = None, config_overrides: Optional[dict] = None,
                      pretrained: bool = True):
    """An `AutoModelForCausalLM` made of the embeddings, the first `layers` blocks, the final norm and the LM head
    of `name_or_path` (all of them when `layers` is None). `config_overrides` (e.g. dropout) are set on the config
    before loading; shape-changing ones only make sense with `pretrained=False` (a random init from the config,
    cut to `layers` the same way). The config's layer count is updated, so save_pretrained/from_pretrained
    round-trip. The student is in train mode."""
    from ..models import load_config

    if layers is not None:  # checked on the config, before any weights load
        try:
            available = getattr(load_config(name_or_path), "num_hidden_layers", None)
        except PkdCacheError:  # load_causal_lm says why in one line
            available = None
        if available is not None and not 1 <= layers <= available:
            raise PkdCacheError(f"--student-layers {layers}: {name_or_path} has {available} layers "
                                f"(use 1..{available})")
    model = load_causal_lm(name_or_path, config_overrides, pretrained)
    path, blocks = find_blocks(model)
    if layers is not None and layers != len(blocks):
        if not 1 <= layers <= len(blocks):
            raise PkdCacheError(f"--student-layers {layers}: {name_or_path} has {len(blocks)} layers")
        parent = model.get_submodule(path.rsplit(".", 1)[0])
        setattr(parent, path.rsplit(".", 1)[1], torch.nn.ModuleList(list(blocks)[:layers]))
        model.config.num_hidden_layers = layers  # GPT-2's attribute_map sets n_layer
        if isinstance(getattr(model.config, "layer_types", None), list):  # Qwen2/Mistral/Gemma: one entry per layer
            model.config.layer_types = model.config.layer_types[:layers]
    return model.train()


def check_same_vocab(student, vocab_size: int, what: str) -> None:
    """The student's logits must be over the teacher's vocabulary (`what`: "the store", "the teacher", ...)."""
    head = student.get_output_embeddings()
    n = head.weight.shape[0] if head is not None else student.config.vocab_size
    if n != vocab_size:
        raise PkdCacheError(f"the student's vocabulary has {n:,} tokens but {what} has {vocab_size:,}; the student "
                            f"must share the teacher's vocabulary (tokenizer)")


Targets = Union[torch.Tensor, Sequence[torch.Tensor], None]


class TokenKD(torch.nn.Module):
    """loss = CE(next token) + alpha * KD(targets), per token, averaged over the positions that have a next token.

    forward(student_logits [B, S, V], input_ids [B, S] int, attention_mask [B, S] (1 = real token), targets)
    -> (loss scalar, parts {"ce", "kd", "tokens"} detached).

    Alignment (docs/TOKEN_KD.md): the student's logits at position t are scored against token t + 1 (CE) and
    against the teacher's target stored FOR position t (KD: the teacher's distribution of token t + 1). Position t
    counts iff tokens t and t + 1 are both real: padding and each row's last real position (no next token)
    contribute nothing to either term, and get a zero gradient (masked before any arithmetic). Targets are per
    position, as a store keeps them (last position included), leading dims [B, S]:
      kind "full":   teacher logits [B, S, V] (FullKDLoss; the teacher at the loss temperature);
      kind "sample": (ids [B, S, M], counts [B, S, M]) from sample_targets (SampledKDLoss, RS-KD's estimator);
                     with objective "kl", a third tensor teacher_entropy [B, S];
      kind "topk":   (ids [B, S, K], logprobs [B, S, K]) from topk_targets (TopKKDLoss: K + the leftover bucket).
    alpha = 0 needs no targets (None): then the loss is Hugging Face's `labels=` loss on the same batch.
    """

    def __init__(self, kind: str = "full", alpha: float = 0.5, temperature: float = 1.0, objective: str = "ce"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.kind, self.alpha = kind, float(alpha)
        self.kd = KINDS[kind](temperature=temperature, objective=objective)

    def forward(self, student_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                targets: Targets = None) -> tuple[torch.Tensor, dict]:
        if student_logits.dim() != 3 or input_ids.shape != student_logits.shape[:2]:
            raise ValueError(f"student_logits must be [B, S, V] and input_ids [B, S], got "
                             f"{tuple(student_logits.shape)} and {tuple(input_ids.shape)}")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if real.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(real.shape)} must be [B, S] like input_ids")
        valid = real[:, :-1] & real[:, 1:]  # [B, S-1]: position t has a real next token
        z = student_logits[:, :-1]
        zv = z[valid].float()  # masked rows dropped first: inf/NaN logits at padding cannot leak in
        count = valid.sum().clamp_min(1)
        if self.alpha > 0 and targets is None:
            raise ValueError(f"alpha = {self.alpha} > 0 needs {self.kind} targets")
        parts = () if targets is None else (targets,) if isinstance(targets, torch.Tensor) else tuple(targets)
        if self.alpha > 0 and self.kind != "full" and self.kd.temperature == 1.0:
            # at T = 1 both terms score the same log-probs: one softmax (and one backward through it) serves both
            nxt = input_ids[:, 1:][valid].long().unsqueeze(-1)
            rows = [t[:, :-1][valid] for t in parts]
            if self.kind == "sample":  # the next token and the draws in one gather; the mean over rows with draws
                ids, counts, *entropy = rows
                has = (counts > 0).any(-1)
                nll = gathered_nll(zv, torch.cat([nxt, torch.where(counts > 0, ids.long(), 0)], -1))
                ce = nll[:, 0].sum() / count
                per_token = self.kd.per_token(nll[:, 1:], counts, *entropy)
                kd = torch.where(has, per_token, 0).sum() / has.sum().clamp_min(1)
            else:  # top-K's rest bucket needs every log-prob
                lp = F.log_softmax(zv, dim=-1)
                ce = -lp.gather(-1, nxt).sum() / count
                kd = self.kd.per_token(lp, *rows).sum() / count
            return ce + self.alpha * kd, {"ce": ce.detach(), "kd": kd.detach(), "tokens": int(valid.sum())}
        ce = F.cross_entropy(zv, input_ids[:, 1:][valid].long(), reduction="sum") / count
        loss, kd = ce, ce.new_zeros(())
        if self.alpha > 0:
            kd = self.kd(z, *(t[:, :-1] for t in parts[:2]), mask=valid,
                         **({"teacher_entropy": parts[2][:, :-1]} if len(parts) > 2 else {}))
            loss = ce + self.alpha * kd
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "tokens": int(valid.sum())}


class HiddenStateMSE(torch.nn.Module):
    """Per-token MSE between student and teacher hidden states of mapped layers, with a learned nn.Linear
    (student width -> teacher width) per mapped layer when the widths differ (its parameters must go to the
    optimizer too).

    layer_map {student index: teacher index} into `output_hidden_states=True` tuples (0 = embeddings, i = after
    block i; HF applies the final norm to the last entry). forward(student_hidden, teacher_hidden (each a sequence
    of [B, S, H]), attention_mask [B, S]) -> scalar: the mean over mapped layers of the MSE over the real positions
    (every real position counts, the last included: a hidden state needs no next token)."""

    def __init__(self, layer_map: dict[int, int], student_width: int, teacher_width: int):
        super().__init__()
        if not layer_map:
            raise ValueError("layer_map is empty")
        self.layer_map = {int(s): int(t) for s, t in layer_map.items()}
        make = (lambda: torch.nn.Linear(student_width, teacher_width)) if student_width != teacher_width \
            else torch.nn.Identity
        self.proj = torch.nn.ModuleDict({str(s): make() for s in self.layer_map})

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        total = 0.0
        for s, t in self.layer_map.items():
            hs, ht = student_hidden[s], teacher_hidden[t]
            real = (torch.ones(hs.shape[:2], dtype=torch.bool, device=hs.device) if attention_mask is None
                    else attention_mask.bool())
            total = total + F.mse_loss(self.proj[str(s)](hs[real].float()), ht[real].float().detach())
        return total / len(self.layer_map)
