"""Building a student: the embeddings and first k layers of a pretrained model, with a new classifier head."""
from __future__ import annotations

import torch

from ..data.tasks import TaskSpec
from ..errors import PkdCacheError
from ..store.fingerprint import vocab_fingerprint
from ..models import LoadedModel, load_config, load_for_task, resolve_model_name


def build_student(init: str, task: TaskSpec, num_layers: int, store_vocab_fingerprint: str | None) -> LoadedModel:
    """The first `num_layers` layers of `init` (as in the PKD paper), its tokenizer, and a freshly initialised head.

    The tokens in a store are the teacher's, so the student's vocabulary must be the same (same fingerprint).
    """
    init = resolve_model_name(init)
    available = getattr(load_config(init), "num_hidden_layers", None)
    if available is not None and num_layers > available:
        raise PkdCacheError(f"--student-layers {num_layers}: --student-init {init} has only {available} layers")
    student = load_for_task(init, task, num_hidden_layers=num_layers, what="student")
    if store_vocab_fingerprint and vocab_fingerprint(student.tokenizer) != store_vocab_fingerprint:
        raise PkdCacheError(f"the tokenizer of --student-init {init} does not match the store's (different vocabulary "
                            f"fingerprint); the student must share the teacher's vocabulary")
    reinit_head(student.model)
    return student


@torch.no_grad()
def reinit_head(model) -> None:
    """A new classification head, even if the init checkpoint had a trained one (BERT's init: N(0, 0.02))."""
    std = getattr(model.config, "initializer_range", 0.02)
    for name, child in model.named_children():
        if name == model.base_model_prefix:
            continue
        for module in child.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def student_cls(hidden_states: tuple[torch.Tensor, ...], num_layers: int) -> torch.Tensor:
    """B x (k-1) x H: the [CLS] vector after each student layer but the last (which the logits cover)."""
    if num_layers <= 1:
        return hidden_states[0][:, :0, :]
    return torch.stack([hidden_states[i][:, 0] for i in range(1, num_layers)], dim=1)
