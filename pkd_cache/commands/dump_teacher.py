"""The teacher a dump runs: the one given, or (its classifier head new, so untrained) that teacher fine-tuned first
with the paper's recipe. A fine-tuned teacher is a cache entry of its own, keyed by what made it (the base
teacher's identity and fine-tune settings, the task, the train data, the max length), so any later dump that needs
the same one reuses it, whatever its format or folder:

    <cache>/teachers/<task>/<teacher>-<id>/        with a local team cache (store/cache.py)
    $PKD_CACHE_HOME/teachers/<task>/<teacher>-<id>/ otherwise (default ~/.cache/pkd-cache)

`finetune` writes it aside and puts it in place only once it is trained, so an interrupted fine-tune leaves nothing
that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..config import DumpConfig, FinetuneConfig, to_dict
from ..data.loading import load_examples
from ..data.tasks import TaskSpec
from ..distributed import Ranks
from ..errors import PkdCacheError
from ..models import FINETUNE_INFO, LoadedModel, load_for_task
from ..progress import log
from ..store.cache import cache_url, store_id, teacher_slug
from ..store.location import is_url


def teachers_root(config: DumpConfig) -> Path:
    """The folder of fine-tuned teachers: in a local team cache, else in the user's cache."""
    cache = cache_url(config.cache)
    if cache and not is_url(cache):
        return Path(cache).expanduser() / "teachers"
    home = os.environ.get("PKD_CACHE_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "pkd-cache"
    return Path(home).expanduser() / "teachers"


def finetuned_teacher_id(config: DumpConfig, task: TaskSpec, key_parts: dict) -> str:
    """The id of the teacher this dump would fine-tune: sha256 of what makes it, cut like a store id."""
    train = key_parts["data"].get("train") or \
        load_examples(task, "train", config.data_dir, config.max_examples).fingerprint()
    made_of = {"teacher": key_parts["teacher"], "task": task.name, "train": train,
               "max_seq_length": config.max_seq_length}
    return store_id(hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest())


def teacher_to_run(config: DumpConfig, task: TaskSpec, loaded: LoadedModel, ranks: Ranks,
                   key_parts: dict) -> tuple[LoadedModel, Optional[Path]]:
    """The teacher as loaded, or (its head new) fine-tuned first; and where dump fine-tuned it, if it did."""
    finetuned_dir = None
    if loaded.head_is_new:
        if ranks.many:
            raise PkdCacheError(f"teacher {loaded.name} has no trained {task.name} head; a multi-rank dump needs a "
                                f"fine-tuned teacher: run `pkd-cache finetune` first")
        target = teachers_root(config) / task.name / \
            f"{teacher_slug(config.teacher)}-{finetuned_teacher_id(config, task, key_parts)}"
        loaded, finetuned_dir = _finetuned_teacher(config, task, loaded, target)
    return loaded, finetuned_dir


def _finetuned_teacher(config: DumpConfig, task, loaded, target: Path) -> tuple[LoadedModel, Path]:
    """A teacher without a trained head is fine-tuned first (the paper's recipe) into `target`, its cache entry.

    A finished fine-tune already there with the same settings is reused: by a dump that failed after it, and by
    every other dump of the same task from the same teacher and data (another format, another --out).
    """
    if not config.finetune:
        raise PkdCacheError(f"teacher {loaded.name} has no trained {task.name} head (its classifier would be "
                            f"newly initialised); fine-tune it with `pkd-cache finetune` or drop --no-finetune")
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
            log(f"reusing the teacher fine-tuned earlier from the same teacher, data and settings: {target}")
            return load_for_task(str(target), task), target
    if target.exists() and any(target.iterdir()) and not config.overwrite:
        raise PkdCacheError(f"{target} (the cache entry of the teacher this dump fine-tunes) holds something else; "
                            f"remove it or pass --overwrite")
    log(f"teacher {loaded.name} has no trained {task.name} head: fine-tuning it first "
        f"({config.finetune_train.epochs:g} epochs, lr {config.finetune_train.learning_rate:g}) into {target}")
    from .finetune import finetune

    ft.overwrite = True  # checked above: what is there is ours to replace
    finetune(ft, loaded=loaded)
    return load_for_task(str(target), task), target
