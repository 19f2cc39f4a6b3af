"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

    <output_dir>/checkpoint/state.safetensors   model.*, extra.* (e.g. the CLS projection), opt.<i>.<key>, rng.*
                                                (rank 0's; under torchrun rng.rank<r>.* holds rank r's)
    <output_dir>/checkpoint/state.json          position {epoch, batch, step}, optimiser param groups, scheduler,
                                                fp16's loss scale (`scaler`), best metric and history

A new checkpoint is written beside the old one and swapped in by renames, so a crash never leaves a half-written
one in its place. `distill --resume` continues from it; a finished run removes it (it is a resume aid, three
times the student's size with the optimiser's moments, not a result).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

NAME = "checkpoint"


def save(output_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    final, tmp, old = output_dir / NAME, output_dir / f".{NAME}.tmp", output_dir / f".{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unshared(tensors), str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors can write: tied weights (a causal LM's embeddings and head share one tensor) are
    saved once per name, as copies; loading them back copies both into the one parameter."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if key is not None and key in seen else v
        seen.add(key)
    return out


def load(output_dir: Path) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    from safetensors.torch import load_file

    final = output_dir / NAME
    if not (final / "state.json").is_file():
        old = output_dir / f".{NAME}.old"  # a crash between the two renames of `save`
        final = old if (old / "state.json").is_file() else final
    if not (final / "state.json").is_file():
        return None
    return load_file(str(final / "state.safetensors")), json.loads((final / "state.json").read_text())


def remove(output_dir: Path) -> None:
    for name in (NAME, f".{NAME}.tmp", f".{NAME}.old"):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def keep_snapshot(output_dir: Path, step: int, limit: int) -> None:
    """`--save-total-limit`: the checkpoint just saved, kept as `checkpoint-<step>/` (the Trainer's name for it;
    resumable like the rolling one), and at most `limit` of them: the oldest go."""
    src, dst = output_dir / NAME, output_dir / f"{NAME}-{step}"
    if not dst.exists():
        tmp = output_dir / f".{NAME}-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dst)
    snapshots = sorted((p for p in output_dir.glob(f"{NAME}-*") if p.name[len(NAME) + 1:].isdigit()),
                       key=lambda p: int(p.name[len(NAME) + 1:]))
    for old in snapshots[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> tuple:
    """The CPU (and, once CUDA is in use, every GPU's) random state: what a checkpoint keeps for a resume."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def rng_to_json(state: tuple) -> dict:
    cpu, cuda = state
    return {"cpu": cpu.tolist(), "cuda": [t.tolist() for t in cuda] if cuda is not None else None}


def rng_from_json(value: dict) -> tuple:
    as_bytes = lambda v: torch.tensor(v, dtype=torch.uint8)  # noqa: E731
    return as_bytes(value["cpu"]), [as_bytes(v) for v in value["cuda"]] if value["cuda"] is not None else None


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
