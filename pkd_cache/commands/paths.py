"""Output folders: pkd-cache replaces only what it wrote, never one of the run's inputs, and only once the new
output is complete.

Every folder pkd-cache writes (a student, a teacher, a sweep) holds `pkd_cache_output.json`: {kind, command,
version, complete, files}. `--overwrite` replaces a folder only if it is recognised as an output of the same kind
(by that marker, or, for outputs of older versions, by pkd-cache's own metrics.json / finetune info / sweep plan)
and holds nothing else than what pkd-cache writes there. Anything else is refused with one line.

A replacement is written aside, in `.<name>.pkd-new` beside the folder, and swapped in when complete
(`.<name>.pkd-old` holds the old folder for the instant between the two renames). A run that fails, or is
killed, leaves the old output as it was. An interrupted `distill` keeps its checkpoint in the folder it was
writing, so `--resume` looks there (`resume_dir`). One run writes an output at a time (output_lock.py).
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..errors import PkdCacheError
from ..store.format import TeacherMeta
from ..version import __version__

MARKER = "pkd_cache_output.json"
NEW, OLD = "pkd-new", "pkd-old"
CHECKPOINTS = ("checkpoint", ".checkpoint.tmp", ".checkpoint.old")  # checkpoint.py's folders
# what `save_pretrained` of a model and its tokenizer writes (any transformers version we support)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin", "vocab.txt", "vocab.json", "merges.txt",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja")
RESULTS = (MARKER, f".{MARKER}.*.tmp", "metrics.json", "metrics.json.tmp", "eval_results.json",
           ".eval_results.json.*.tmp")
SNAPSHOTS = ("checkpoint-*", ".checkpoint-*.tmp")  # --save-total-limit's copies (checkpoint.keep_snapshot)
OURS = {"student": (*RESULTS, *CHECKPOINTS, *SNAPSHOTS, *MODEL_FILES, "README.md", "runs", "predict_results_*.txt"),
        "teacher": (*RESULTS, "pkd_cache_finetune.json", *MODEL_FILES)}
KIND_NAMES = {"student": "student folder", "teacher": "fine-tuned teacher folder", "sweep": "sweep folder",
              "store": "store"}


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def output_kind(folder: Path) -> Optional[str]:
    """'student', 'teacher', 'sweep' or 'store' for a folder pkd-cache wrote; None for anything else."""
    marker = _json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("kind") in KIND_NAMES:
        return marker["kind"]
    if (folder / "zarr.json").is_file() or (folder / "pkd_cache.json").is_file():
        return "store"
    if (folder / "pkd_cache_finetune.json").is_file():
        return "teacher"
    if (folder / "sweep.json").is_file():
        return "sweep"
    metrics = _json(folder / "metrics.json")
    if isinstance(metrics, dict) and "student_layers" in metrics and "layer_map" in metrics:
        return "student"
    if has_checkpoint(folder):  # a distill that was interrupted before its first metrics.json
        return "student"
    return None


def has_checkpoint(folder: Path) -> bool:
    return any((folder / name / "state.json").is_file() for name in CHECKPOINTS)


def entries(folder: Path) -> list[str]:
    """The folder's entries; a folder holding only a marker (a run killed as it started) counts as empty."""
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir())
    return [] if names == [MARKER] else names


def _foreign(folder: Path, kind: str, names: list[str]) -> list[str]:
    """Entries pkd-cache does not write into a `kind` folder (a thesis.tex someone put there)."""
    marker = _json(folder / MARKER)
    recorded = set(marker.get("files") or []) if isinstance(marker, dict) else set()
    patterns = OURS.get(kind, ())
    return [n for n in names if n not in recorded and not any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def aside(final: Path, what: str) -> Path:
    final = final.expanduser().absolute()
    return final.parent / f".{final.name}.{what}"


def check_inputs(out: Path, inputs: Iterable[tuple[str, Optional[str]]], flag: str, shown: str) -> None:
    """The output is never one of the run's inputs, nor a folder containing one, nor inside the store."""
    target = out.expanduser().resolve()
    for label, value in inputs:
        if not value or "://" in str(value):
            continue
        p = Path(value).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if p == target:
            raise PkdCacheError(f"{flag} {shown} is {label} ({value}); choose another {flag}")
        if target in p.parents:
            raise PkdCacheError(f"{flag} {shown} contains {label} ({value}); choose another {flag}")
        if label == "the store" and p in target.parents:
            raise PkdCacheError(f"{flag} {shown} is inside {label} ({value}); choose another {flag}")


def model_inputs(store: Optional[str], teacher: TeacherMeta, *extra: tuple[str, Optional[str]]) -> list:
    """The inputs of a run that trains from a store: the store, the teacher it recorded, and `extra` ones."""
    recorded = (teacher.name_or_path, teacher.resolved, teacher.finetuned_by_dump)
    return [("the store", store), *(("the store's teacher", t) for t in recorded if t is not None), *extra]


def check_output_dir(path: str, overwrite: bool, kind: str = "student", flag: str = "--output-dir",
                     inputs: Iterable[tuple[str, Optional[str]]] = ()) -> Path:
    """Refuse what this run may not write into or replace; touches nothing (call before expensive work).

    Empty or missing: fine. A `kind` folder pkd-cache wrote: needs `overwrite`. Anything else: refused."""
    p = Path(path).expanduser()
    check_inputs(p, inputs, flag, path)
    if p.exists() and not p.is_dir():
        raise PkdCacheError(f"{flag} {path} exists and is not a directory")
    names = entries(p)
    if not names:
        return p
    found = output_kind(p)
    if found is not None and found != kind:
        raise PkdCacheError(f"{flag} {path} is a pkd-cache {KIND_NAMES[found]}, not a {KIND_NAMES[kind]}; "
                            f"--overwrite will not replace it: choose another {flag}")
    foreign = _foreign(p, kind, names) if found == kind else names
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise PkdCacheError(f"{flag} {path} already exists and is not empty, and holds {foreign[0]}{more}, which "
                            f"pkd-cache did not write; --overwrite only replaces a {KIND_NAMES[kind]} pkd-cache "
                            f"wrote: choose another {flag}")
    if not overwrite:
        raise PkdCacheError(f"{flag} {path} already exists and is not empty; pass --overwrite to replace it")
    return p


@dataclass
class Output:
    """An output being written: `work` is where files go; `commit` makes it `final` (swapping out the old one)."""

    final: Path
    work: Path
    kind: str
    command: str

    @property
    def aside(self) -> bool:
        return self.work != self.final

    def record(self, complete: bool = False) -> None:
        """(Re)write the marker: the files written so far are pkd-cache's, so a later --overwrite may replace them."""
        files = sorted(n for n in os.listdir(self.work) if n != MARKER)
        _write_json(self.work / MARKER, {"kind": self.kind, "command": self.command, "pkd_cache_version": __version__,
                                         "complete": complete, "files": files})

    def commit(self) -> Path:
        """Mark complete and put it in place; the old output (if any) is removed only after the swap."""
        self.record(complete=True)
        if self.aside:
            _swap_in(self.work, self.final)
        return self.final

    def abandon(self, keep_checkpoint: bool = True) -> None:
        """A failed run: drop a write-aside folder (unless its checkpoint can be resumed); the old output stays."""
        if keep_checkpoint and has_checkpoint(self.work):
            return
        if self.aside:
            shutil.rmtree(self.work, ignore_errors=True)
        elif not entries(self.work):  # nothing but our marker: leave the folder as empty as we found it
            (self.work / MARKER).unlink(missing_ok=True)


def prepare_output(path: str, overwrite: bool, kind: str, command: str, flag: str = "--output-dir",
                   inputs: Iterable[tuple[str, Optional[str]]] = (), always_aside: bool = False) -> Output:
    """Start writing an output (checked as `check_output_dir`; call under the output's lock, once the inputs have
    loaded). An existing output is replaced by writing aside; so is a new one with `always_aside` (no resume)."""
    final = check_output_dir(path, overwrite, kind, flag, inputs).absolute()
    recover(final)
    staging = aside(final, NEW)
    if staging.exists():  # an earlier replacement that never finished: superseded by this run
        _remove_ours(staging, kind, flag, path)
    if entries(final) or always_aside:
        work = staging
    else:
        work = final
    work.mkdir(parents=True, exist_ok=True)
    out = Output(final, work, kind, command)
    out.record()
    return out


def resume_output(path: str, kind: str, command: str) -> Output:
    """The output an interrupted run was writing (with its checkpoint), to continue it."""
    final = Path(path).expanduser().absolute()
    recover(final)
    return Output(final, resume_dir(path), kind, command)


def resume_dir(path: str) -> Path:
    """Where `--resume` finds the checkpoint: the output folder, or the folder its replacement was written aside."""
    final = Path(path).expanduser().absolute()
    staging = aside(final, NEW)
    return staging if not has_checkpoint(final) and has_checkpoint(staging) else final


def recover(final: Path) -> None:
    """Finish or undo a swap a crash cut between its renames (call under the output's lock)."""
    old, new = aside(final, OLD), aside(final, NEW)
    if not old.exists():
        return
    if not final.exists():
        marker = _json(new / MARKER)
        done = isinstance(marker, dict) and marker.get("complete") is True
        os.replace(new if done else old, final)
    if final.exists() and old.exists():
        shutil.rmtree(old)


def _swap_in(work: Path, final: Path) -> None:
    old = aside(final, OLD)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_ours(folder: Path, kind: str, flag: str, path: str) -> None:
    marker = _json(folder / MARKER)
    if folder.is_dir() and ((isinstance(marker, dict) and marker.get("kind") == kind) or not any(folder.iterdir())):
        shutil.rmtree(folder)
        return
    raise PkdCacheError(f"{flag} {path}: {folder} is in the way of writing it aside and pkd-cache did not write it; "
                        f"move it")


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def mark_folder(folder: Path, kind: str, command: str) -> None:
    """A marker for a folder pkd-cache fills over time (a sweep's), if it has none."""
    if not (folder / MARKER).is_file():
        _write_json(folder / MARKER, {"kind": kind, "command": command, "pkd_cache_version": __version__})


def save_eval_results(folder: Path, results: dict) -> Optional[Path]:
    """eval_results.json beside a model pkd-cache wrote (a student or teacher folder), written aside and renamed;
    its path. Any other folder (a downloaded model, another tool's output with its own eval_results.json) is left as
    it was (None): the scores are printed either way."""
    if not folder.is_dir() or output_kind(folder) not in ("student", "teacher"):
        return None
    tmp = folder / f".eval_results.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(folder / "eval_results.json")
    return folder / "eval_results.json"
