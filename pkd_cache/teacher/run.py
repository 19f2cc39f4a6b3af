"""One teacher forward pass: the logits and the [CLS] vector of every layer."""
from __future__ import annotations

import torch


@torch.inference_mode()
def teacher_outputs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits B x C, cls B x (L+1) x H): cls[:, 0] is the embedding output, cls[:, i] the output of layer i."""
    out = model(**inputs, output_hidden_states=True)
    cls = torch.stack([h[:, 0] for h in out.hidden_states], dim=1)
    return out.logits.float(), cls
