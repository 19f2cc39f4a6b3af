"""The teacher a dump runs: the one given, or (its classifier head new, so untrained) that teacher fine-tuned first
with the paper's recipe. A fine-tuned teacher is a cache entry of its own, keyed by what made it (the base
teacher's identity and fine-tune settings, the task, the train data, the max length), so any later dump that needs
the same one reuses it, whatever its format or folder:

    <cache>/teachers/<task>/<teacher>-<id>/        with a local team cache (store/cache.py)
    $PKD_CACHE_HOME/teachers/<task>/<teacher>-<id>/ otherwise (default ~/.cache/pkd-cache)

With a bucket cache (s3://, gs://, ...), the teacher is also shared there, at `<cache>/teachers/<task>/<teacher>-<id>/`:
uploaded once trained (its FINETUNE_INFO last, so a copy without it is unfinished), and copied from there into the
user's cache by a dump on another machine instead of fine-tuning again.

`finetune` writes it aside and puts it in place only once it is trained, so an interrupted fine-tune leaves nothing
that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..config import DumpConfig, FinetuneConfig, to_dict, train_identity
from ..data.loading import load_examples
from ..data.tasks import TaskSpec
from ..distributed import Ranks
from ..errors import PkdCacheError
from ..models import FINETUNE_INFO, LoadedModel, load_for_task
from ..progress import log
from ..store.cache import cache_url, store_id, teacher_slug
from ..store.location import Location, is_url


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
        cache = cache_url(config.cache)
        shared = Location(f"{cache.rstrip('/')}/teachers/{task.name}/{target.name}") \
            if cache and is_url(cache) else None
        if shared is not None:
            _copy_from(shared, target)
        loaded, finetuned_dir = _finetuned_teacher(config, task, loaded, target)
        if shared is not None:
            _share(target, shared)
    return loaded, finetuned_dir


def _copy_from(shared: Location, target: Path) -> None:
    """The fine-tuned teacher from a bucket cache into `target`, if the bucket holds a finished one and `target`
    nothing yet (written aside, then renamed: a copy cut short leaves nothing that looks finished)."""
    if target.exists() or not shared.exists(FINETUNE_INFO):
        return
    log(f"copying the teacher fine-tuned earlier from the same teacher and data from {shared}")
    aside = target.with_name(f".{target.name}.{os.getpid()}.copy")
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    for name in shared.list(""):
        if name.startswith(".") or "/" in name or "\\" in name:  # a name that could leave the folder: not ours
            continue
        (aside / name).write_bytes(shared.read(name))
    try:
        os.rename(aside, target)
    except OSError:  # another dump put it in place meanwhile
        shutil.rmtree(aside, ignore_errors=True)


def _share(target: Path, shared: Location) -> None:
    """Upload a fine-tuned teacher into the bucket cache unless it holds a finished one; FINETUNE_INFO last."""
    if shared.exists(FINETUNE_INFO):
        return
    files = sorted(p for p in target.iterdir() if p.is_file() and p.name != FINETUNE_INFO)
    for p in files + [target / FINETUNE_INFO]:
        shared.write(p.name, p.read_bytes())
    log(f"shared the fine-tuned teacher in the cache: {shared}")


_MADE_WITH = ("task", "max_seq_length", "max_train_samples", "max_eval_samples", "train")


def _made_with(config: dict) -> dict:
    made = {k: v for k, v in config.items() if k in _MADE_WITH}
    if isinstance(made.get("train"), dict):
        made["train"] = train_identity(made["train"])
    return made


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
        # the base teacher and data are in the entry's id; the paths (model, data_dir, output_dir) may be another
        # machine's, for a teacher copied from a bucket cache
        info = json.loads(info_path.read_text())
        same = _made_with(to_dict(ft)) == _made_with(info.get("config", {}))
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
