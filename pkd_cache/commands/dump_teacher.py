"""The teacher a dump runs: the one given, or (its classifier head new, so untrained) that teacher fine-tuned first
with the paper's recipe into `<store>.teacher`, which a later dump with the same settings reuses."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..config import DumpConfig, FinetuneConfig, to_dict
from ..data.tasks import TaskSpec
from ..distributed import Ranks
from ..errors import PkdCacheError
from ..models import FINETUNE_INFO, LoadedModel, load_for_task
from ..progress import log
from ..store.location import is_url


def finetuned_teacher_dir(out: str) -> Path:
    """Where `dump` keeps a teacher it had to fine-tune: beside the store (`sst2.zarr` -> `sst2.teacher`), or in
    the current folder when the store is remote (`s3://bucket/sst2.zarr` -> `./sst2.teacher`)."""
    p = Path(out.rstrip("/").rsplit("/", 1)[-1]) if is_url(out) else Path(out).expanduser()
    return p.with_name(p.name[:-5] + ".teacher" if p.name.endswith(".zarr") else p.name + ".teacher")


def teacher_to_run(config: DumpConfig, task: TaskSpec, loaded: LoadedModel,
                   ranks: Ranks) -> tuple[LoadedModel, Optional[Path]]:
    """The teacher as loaded, or (its head new) fine-tuned first; and where dump fine-tuned it, if it did."""
    finetuned_dir = None
    if loaded.head_is_new:
        if ranks.many:
            raise PkdCacheError(f"teacher {loaded.name} has no trained {task.name} head; a multi-rank dump needs a "
                                f"fine-tuned teacher: run `pkd-cache finetune` first")
        loaded, finetuned_dir = _finetuned_teacher(config, task, loaded)
    return loaded, finetuned_dir


def _finetuned_teacher(config: DumpConfig, task, loaded) -> tuple[LoadedModel, Path]:
    """A teacher without a trained head is fine-tuned first (the paper's recipe) into `<store>.teacher`.

    A finished fine-tune already there with the same settings is reused, so a dump that failed after the
    fine-tune does not pay for it twice.
    """
    if not config.finetune:
        raise PkdCacheError(f"teacher {loaded.name} has no trained {task.name} head (its classifier would be "
                            f"newly initialised); fine-tune it with `pkd-cache finetune` or drop --no-finetune")
    target = finetuned_teacher_dir(config.out)
    ft = FinetuneConfig(model=loaded.name, task=task.name, output_dir=str(target), data_dir=config.data_dir,
                        max_seq_length=config.max_seq_length, overwrite=config.overwrite,
                        max_train_samples=config.max_examples, max_eval_samples=config.max_examples,
                        train=config.finetune_train)
    info_path = target / FINETUNE_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        same = {k: v for k, v in to_dict(ft).items() if k != "overwrite"} == \
            {k: v for k, v in info.get("config", {}).items() if k != "overwrite"}
        if same and "metrics" in info:
            log(f"reusing the teacher fine-tuned earlier with the same settings in {target}")
            return load_for_task(str(target), task), target
    if target.exists() and any(target.iterdir()) and not config.overwrite:
        raise PkdCacheError(f"{target} (where dump keeps the teacher it fine-tunes) exists from other settings; "
                            f"remove it or pass --overwrite")
    log(f"teacher {loaded.name} has no trained {task.name} head: fine-tuning it first "
        f"({config.finetune_train.epochs:g} epochs, lr {config.finetune_train.learning_rate:g}) into {target}")
    from .finetune import finetune

    ft.overwrite = True  # checked above: what is there is ours to replace
    finetune(ft, loaded=loaded)
    return load_for_task(str(target), task), target
