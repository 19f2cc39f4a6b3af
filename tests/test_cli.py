"""The `pkd-cache` command line, run as a real subprocess (`python -m pkd_cache ...`).

The end-to-end chain (finetune -> dump -> info -> distill -> eval), `--debug`, and every bad input of
docs/ERRORS.md, whose messages are checked against that document: each case is a test of its own, so that
`-k one_case` runs one process. A subprocess pays ~2 s (more on a busy machine) for importing torch before it
does anything (8-9 s here with transformers' model code), so the processes of the tests selected in this module
start ahead, WORKERS at a time, and each test waits for its own. Each command has at least one bad input run as a
real process (`Case.subprocess`: exit code, stderr and no traceback as a user sees them); the other cases run in this
process through typer's CliRunner, the traceback a crash would print added to stderr, which halves this module's
time. PKD_CACHE_TEST_IN_PROCESS=0 runs every case as a real process; PKD_CACHE_WRITE_ERRORS_DOC=1 rewrites
docs/ERRORS.md from what the commands print.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from pkd_cache.testing.tamper import decode, edit_array, edit_attributes, rewrite_chunk

from pkd_cache.testing import cli, cli_env, cli_in_process, make_bert, make_causal_lm, show, tree_digest, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # about 15 CLI processes, the rest in this process

ENV = cli_env()  # what a CLI subprocess gets
WORKERS = 2
SEQ = "24"
# every case as a real process (PKD_CACHE_TEST_IN_PROCESS=0), or (the default) only those marked `subprocess`
ALL_IN_SUBPROCESS = os.environ.get("PKD_CACHE_TEST_IN_PROCESS", "1") == "0"


def attributes(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


# --- end to end: finetune -> dump -> info -> distill -> eval ---------------------------------------------------------

def run_pipeline(tmp: Path, backbone: Path, data: Path) -> dict:
    """Each step only if the ones it needs worked (`info` beside `distill`); {step: CompletedProcess} and the paths."""
    paths = {"teacher": tmp / "teacher", "store": tmp / "sst2.zarr", "student": tmp / "student"}
    results = {}
    results["finetune"] = cli("finetune", "--model", backbone, "--task", "sst2", "--data-dir", data,
                              "--output-dir", paths["teacher"], "--max-steps", "3", "--epochs", "1",
                              "--max-seq-length", SEQ)
    if results["finetune"].returncode == 0:
        results["dump"] = cli("dump", "--teacher", paths["teacher"], "--task", "sst2", "--data-dir", data,
                              "--out", paths["store"], "--max-seq-length", SEQ, "--chunk-size", "64")
    if results.get("dump") and results["dump"].returncode == 0:
        with ThreadPoolExecutor(1) as beside:
            info = beside.submit(cli, "info", paths["store"])
            results["distill"] = cli("distill", "--store", paths["store"], "--output-dir", paths["student"],
                                     "--student-layers", "2", "--student-init", backbone, "--epochs", "1")
            results["info"] = info.result()
    if results.get("distill") and results["distill"].returncode == 0:
        results["eval"] = cli("eval", "--model", paths["student"], "--task", "sst2", "--data-dir", data, "--json")
        results["eval_table"] = cli("eval", "--model", paths["student"], "--task", "sst2", "--data-dir", data)
    return {"results": results, **paths}


# --- bad input -------------------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    tmp: Path  # a fresh folder for this case
    data: Path
    backbone: Path
    teacher: Path
    teacher3: Path  # a 3-label teacher
    store: Path
    state: dict = field(default_factory=dict)  # what the case's check needs to know


@dataclass
class Case:
    setup: Callable[[Ctx], list]  # -> CLI arguments
    expect: tuple[str, ...]  # fragments of the error message
    check: Optional[Callable[[Ctx], None]] = None  # afterwards: nothing written, nothing touched
    subprocess: bool = False  # run as a real process (one case per command is), else in this process
    doc_until: Optional[str] = None  # docs/ERRORS.md shows the message up to here (the rest is a library's words)


def sst2_files(folder: Path, header: str, rows: list[str]) -> Path:
    folder.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("\n".join([header] + rows) + "\n")
    return folder


def dump_args(c: Ctx, *extra, teacher=None, data=None, task="sst2", out=None) -> list:
    return ["dump", "--teacher", teacher or c.teacher, "--task", task, "--data-dir", data or c.data,
            "--out", out or c.tmp / "out.zarr", "--max-seq-length", SEQ, *extra]


def distill_args(c: Ctx, *extra, store=None) -> list:
    return ["distill", "--store", store or c.store, "--output-dir", c.tmp / "student", "--student-layers", "2",
            "--student-init", c.backbone, *extra]


def lm_dump_args(c: Ctx, *extra, teacher=None, corpus: Optional[Path] = ...) -> list:
    """`dump --task lm` of a tiny causal LM (vocabulary 26, 2 layers) over a small jsonl corpus."""
    if corpus is ...:
        corpus = write_jsonl(c.tmp / "corpus.jsonl", [{"text": "a good film and a bad plot"}] * 8)
    data = ["--data-files", corpus] if corpus is not None else []
    return ["dump", "--teacher", teacher or make_causal_lm(c.tmp / "gpt2"), "--task", "lm", *data, "--out",
            c.tmp / "out.zarr", "--logits", "sample:16", *extra]


def finetune_args(c: Ctx, *extra, model=None, task="sst2", output_dir=None) -> list:
    return ["finetune", "--model", model or c.backbone, "--task", task, "--data-dir", c.data,
            "--output-dir", output_dir or c.tmp / "teacher", "--max-steps", "1", "--max-seq-length", SEQ, *extra]


def no_store(c: Ctx) -> None:
    assert not (c.tmp / "out.zarr").exists()
    assert not (c.tmp / "home" / "teachers").exists()  # where dump would fine-tune a head-less teacher (case_env)


def no_student(c: Ctx) -> None:
    assert not (c.tmp / "student").exists() or not any((c.tmp / "student").iterdir())


def no_teacher(c: Ctx) -> None:
    assert not (c.tmp / "teacher").exists() or not any((c.tmp / "teacher").iterdir())


def existing_dir(c: Ctx, name: str) -> Path:
    d = c.tmp / name
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    c.state["digest"] = tree_digest(d)
    c.state["dir"] = d
    return d


def earlier_teacher(c: Ctx) -> Path:
    """A teacher folder an earlier `finetune` wrote: what `--overwrite` may replace, once the new one is complete."""
    d = c.tmp / "teacher"
    shutil.copytree(c.teacher, d)
    (d / "pkd_cache_finetune.json").write_text(json.dumps({"base_model": str(c.backbone)}))
    c.state["digest"], c.state["dir"] = tree_digest(d), d
    return d


def untouched(c: Ctx) -> None:
    assert tree_digest(c.state["dir"]) == c.state["digest"]


def copy_store(c: Ctx, complete: bool) -> Path:
    dst = c.tmp / "copy.zarr"
    shutil.copytree(c.store, dst)
    meta = json.loads((dst / "zarr.json").read_text())
    meta["attributes"]["complete"] = complete
    (dst / "zarr.json").write_text(json.dumps(meta))
    c.state["dir"], c.state["digest"] = dst, tree_digest(dst)
    return dst


def other_vocab(c: Ctx) -> Path:
    """The students' backbone with one more token in its vocabulary."""
    from transformers import AutoTokenizer

    dst = c.tmp / "other-vocab"
    shutil.copytree(c.backbone, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(["zzzz"])
    tok.save_pretrained(dst)
    return dst


def relabelled_store(c: Ctx) -> Path:
    dst = copy_store(c, complete=True)
    meta = json.loads((dst / "zarr.json").read_text())
    meta["attributes"]["task"]["label_names"] = ["positive", "negative"]
    (dst / "zarr.json").write_text(json.dumps(meta))
    return dst


def incomplete_untouched(c: Ctx) -> None:
    untouched(c)
    assert attributes(c.state["dir"])["complete"] is False
    no_student(c)


CASES: dict[str, Case] = {
    "unknown-task": Case(lambda c: finetune_args(c, task="sst3"), ("unknown task 'sst3'", "sst2"), no_teacher,
                         subprocess=True),
    "missing-columns": Case(lambda c: dump_args(c, data=sst2_files(c.tmp / "d", "text\tlabel", ["good film\t1"])),
                            ("no text column", "sentence", "found: text, label"), no_store, subprocess=True),
    "labels-outside-set": Case(
        lambda c: dump_args(c, data=sst2_files(c.tmp / "d", "sentence\tlabel", ["good film\t1", "bad film\t2"])),
        ("example 1: label 2 is outside", "0..1"), no_store),
    "teacher-label-count": Case(lambda c: dump_args(c, teacher=c.teacher3), ("3-label head", "sst2 has 2 labels"),
                                no_store),
    "out-exists": Case(lambda c: dump_args(c, out=copy_store(c, complete=True)),
                       ("holds a different dump", "chunk_size 64 -> 1024", "--overwrite"), untouched),
    "out-unfinished": Case(lambda c: dump_args(c, out=copy_store(c, complete=False)),
                           ("unfinished store", "--overwrite"), untouched),
    "incomplete-store": Case(lambda c: distill_args(c, store=copy_store(c, complete=False)),
                             ("not complete",), incomplete_untouched, subprocess=True),
    "distill-task-mismatch": Case(lambda c: distill_args(c, "--task", "rte"),
                                  ("--task rte does not match the store's task sst2",), no_student),
    "distill-student-vocab": Case(lambda c: distill_args(c, "--student-init", other_vocab(c)),
                                  ("tokenizer of --student-init", "vocabulary"), no_student),
    "distill-store-labels": Case(lambda c: distill_args(c, store=relabelled_store(c)),
                                 ("labels ['positive', 'negative'] differ", "['negative', 'positive']"), no_student),
    "layer-map-out-of-range": Case(lambda c: distill_args(c, "--layer-map", "5"),
                                   ("--layer-map 5", "out of range", "1..4"), no_student),
    "layer-map-wrong-length": Case(lambda c: distill_args(c, "--layer-map", "1,2"),
                                   ("--layer-map needs 1", "got 2"), no_student),
    "teacher-missing": Case(lambda c: dump_args(c, teacher=c.tmp / "no-such-teacher"),
                            ("no-such-teacher", "does not exist"), no_store),
    "no-finetune-headless": Case(lambda c: dump_args(c, "--no-finetune", teacher=c.backbone),
                                 ("no trained sst2 head", "--no-finetune"), no_store),
    "finetune-batch-size-zero": Case(lambda c: finetune_args(c, "--batch-size", "0"), ("--batch-size must be > 0",),
                                     no_teacher),
    "finetune-learning-rate-zero": Case(lambda c: finetune_args(c, "--learning-rate", "0"),
                                        ("--learning-rate must be > 0",), no_teacher),
    "distill-epochs-negative": Case(lambda c: distill_args(c, "--epochs", "-1"), ("--epochs must be > 0",),
                                    no_student),
    "distill-temperature-zero": Case(lambda c: distill_args(c, "--temperature", "0"), ("--temperature must be > 0",),
                                     no_student),
    "eval-batch-size-zero": Case(lambda c: ["eval", "--model", c.teacher, "--task", "sst2", "--data-dir", c.data,
                                            "--batch-size", "0"], ("--batch-size must be > 0",)),
    "dump-finetune-epochs-zero": Case(lambda c: dump_args(c, "--finetune-epochs", "0", teacher=c.backbone),
                                      ("--finetune-epochs must be > 0",), no_store),
    "dump-sort-window-zero": Case(lambda c: dump_args(c, "--sort-window", "0"), ("--sort-window must be > 0",),
                                  no_store),
    "dump-unknown-format": Case(lambda c: dump_args(c, "--format", "parquet"),
                                ("unknown store format 'parquet'; pkd-cache writes zarr, arrow",), no_store),
    "dump-no-out-no-cache": Case(lambda c: [a for a in dump_args(c) if a not in ("--out", c.tmp / "out.zarr")],
                                 ("dump needs --out, or a cache to put the store in (--cache URL or PKD_CACHE)",),
                                 no_store),
    "gc-no-limit": Case(lambda c: ["gc", "--cache", empty_cache(c)],
                        ("gc needs --older-than or --max-size (or both)",), subprocess=True),
    "gc-bad-duration": Case(lambda c: ["gc", "--cache", empty_cache(c), "--older-than", "ninety days"],
                            ("--older-than takes a duration like 90d, 12h or 30m; got 'ninety days'",)),
    "info-unknown-id": Case(lambda c: ["info", "abcdef12", "--cache", empty_cache(c)], ("has id abcdef12",)),
    "distill-id-without-cache-entry": Case(lambda c: distill_args(c, "--cache", c.tmp / "no-cache", store="abcdef12"),
                                           ("/no-cache does not exist (PKD_CACHE or --cache names it)",), no_student),
    "distill-per-device-batch-size-zero": Case(lambda c: distill_args(c, "--per-device-train-batch-size", "0"),
                                               ("--per-device-train-batch-size must be > 0",), no_student),
    "distill-batch-size-conflict": Case(lambda c: distill_args(c, "--batch-size", "64",
                                                               "--per-device-train-batch-size", "16"),
                                        ("--batch-size 64 (the global batch) disagrees with "
                                         "--per-device-train-batch-size 16 x 1 rank(s) x --gradient-accumulation-steps"
                                         " 1 = 16; give only one of the two (or add --gradient-accumulation-steps 4)",),
                                        no_student),
    "finetune-overwrite-keeps-output-on-failure": Case(
        lambda c: finetune_args(c, "--overwrite", model=c.tmp / "no-such-model", output_dir=earlier_teacher(c)),
        ("does not exist",), untouched),
    "distill-output-is-the-store": Case(lambda c: ["distill", "--store", copy_store(c, complete=True), "--output-dir",
                                                   c.tmp / "copy.zarr", "--overwrite", "--student-layers", "2",
                                                   "--student-init", c.backbone],
                                        ("is the store", "choose another --output-dir"), untouched),
    "distill-overwrite-foreign-folder": Case(lambda c: ["distill", "--store", c.store, "--output-dir",
                                                        existing_dir(c, "project"), "--overwrite", "--student-layers",
                                                        "2", "--student-init", c.backbone],
                                             ("holds keep.txt, which pkd-cache did not write",), untouched),
    "not-a-store": Case(lambda c: ["info", c.data], ("is not a pkd-cache store",), subprocess=True),
    "eval-max-examples-negative": Case(lambda c: ["eval", "--model", c.teacher, "--task", "sst2", "--data-dir", c.data,
                                                  "--max-examples=-5"], ("must be > 0, got -5",)),
    "eval-max-seq-length-beyond-positions": Case(  # the tiny teacher has 64 positions, the sentence 102 tokens
        lambda c: ["eval", "--model", c.teacher, "--task", "sst2", "--max-seq-length", "128",
                   "--data-dir", sst2_files(c.tmp / "d", "sentence\tlabel", [" ".join(["good film"] * 50) + "\t1"])],
        ("--max-seq-length 128", "position embeddings")),
    "eval-unknown-model": Case(lambda c: ["eval", "--model", c.tmp / "no-such-model", "--task", "sst2", "--data-dir",
                                          c.data], ("no-such-model", "does not exist"), subprocess=True),
    "eval-lm-without-data-files": Case(lambda c: ["eval", "--model", c.teacher, "--task", "lm"],
                                       ("eval --task lm scores perplexity on a held-out corpus",)),
    "eval-lm-not-a-causal-lm": Case(lambda c: ["eval", "--model", c.teacher, "--task", "lm", "--data-files",
                                               write_jsonl(c.tmp / "heldout.jsonl", [{"text": "a good film"}])],
                                    ("is a bert model, not a causal LM",)),
    "eval-lm-empty-corpus": Case(lambda c: ["eval", "--model", c.teacher, "--task", "lm", "--data-files",
                                            write_jsonl(c.tmp / "empty.jsonl", [])], ("the corpus is empty",)),
    "dump-lm-without-data-files": Case(lambda c: lm_dump_args(c, corpus=None), ("dump --task lm needs a corpus",),
                                       no_store),
    "dump-lm-not-a-causal-lm": Case(lambda c: lm_dump_args(c, teacher=c.teacher), ("is a bert model, not a causal LM",),
                                    no_store),
    "dump-lm-encoder-without-hidden-layers": Case(lambda c: lm_dump_args(c, "--logits", "none", teacher=c.teacher),
                                                  ("is an encoder (bert) and --logits is none: pass --hidden-layers",),
                                                  no_store),
    "dump-lm-topk-out-of-range": Case(lambda c: lm_dump_args(c, "--logits", "topk:0"), ("K must be in [1, 26]",),
                                      no_store),
    "dump-lm-sample-beyond-vocab": Case(lambda c: lm_dump_args(c, "--logits", "sample:100000"),
                                        ("N must be in [1, 26]",), no_store),
    "dump-lm-bad-logit-spec": Case(lambda c: lm_dump_args(c, "--logits", "top12"),
                                   ("is not one of sample:N, topk:K or none",), no_store),
    "dump-lm-hidden-layer-out-of-range": Case(lambda c: lm_dump_args(c, "--hidden-layers", "3"),
                                              ("--hidden-layers 3 is out of range: the teacher has 2 layers",), no_store,
                                              subprocess=True),
    "dump-lm-empty-corpus": Case(lambda c: lm_dump_args(c, corpus=write_jsonl(c.tmp / "empty.jsonl", [])),
                                 ("the corpus is empty",), no_store),
    "dump-lm-document-longer-than-max-length": Case(
        lambda c: lm_dump_args(c, "--sequence-mode", "none", "--max-seq-length", "4"),
        ("more than --max-seq-length 4, and cutting is off",), no_store),
    "distill-max-tokens-on-a-sentence-store": Case(lambda c: distill_args(c, "--max-tokens", "512"),
                                                   ("--max-tokens is for token stores",), no_student),
    "distill-unknown-student-init": Case(lambda c: distill_args(c, "--student-init", c.tmp / "no-such-model"),
                                         ("no-such-model", "does not exist"), no_student),
    "ragged-row": Case(lambda c: dump_args(c, data=sst2_files(c.tmp / "d", "sentence\tlabel",
                                                              ["good film\t1", "bad film\t0\tsurplus"])),
                       ("line 3: 3 fields where the header has 2",), no_store),
    "quoted-tab": Case(lambda c: dump_args(c, data=sst2_files(c.tmp / "d", "sentence\tlabel", ['"good\tfilm"\t1'])),
                       ("line 2: 3 fields where the header has 2",), no_store),
    "empty-data-file": Case(lambda c: dump_args(c, data=empty_files(c)), ("the file is empty",), no_store),
    "text-labels": Case(lambda c: dump_args(c, data=sst2_files(c.tmp / "d", "sentence\tlabel", ["good film\tgood"])),
                        ("label 'good' is not in the task's label set",), no_store),
    "not-a-classifier": Case(lambda c: dump_args(c, teacher=not_a_model(c)),
                             ("is not a sequence-classification encoder",), no_store,
                             doc_until="transformers can load:"),
    "dump-max-seq-length-beyond-positions": Case(lambda c: dump_args(c, "--max-seq-length", "100"),
                                                 ("--max-seq-length 100", "position embeddings"), no_store),
    "student-deeper-than-teacher": Case(lambda c: distill_args(c, "--student-layers", "5"),
                                        ("5-layer student is deeper than the store's 4-layer teacher",), no_student),
    "store-newer-format": Case(lambda c: distill_args(c, store=newer_format_store(c)),
                               ("format version 99", "upgrade pkd-cache"), no_student),
    "store-not-a-store": Case(lambda c: distill_args(c, store=c.data), ("is not a pkd-cache store",), no_student),
    "store-corrupt-chunk": Case(lambda c: distill_args(c, store=corrupt_store(c)),
                                ("chunk train/cls/c/0/", "is corrupt", "pkd-cache verify"), no_student),
    "store-no-manifest": Case(lambda c: distill_args(c, store=store_without_manifest(c)),
                              ("has no checksum manifest", "--allow-no-checksums"), no_student),
    "store-altered-array": Case(lambda c: distill_args(c, store=altered_store(c)),
                                ("train/logits: array has data type 'float64', the metadata says float32",
                                 "pkd-cache verify"), no_student),
    "store-missing-chunk": Case(lambda c: distill_args(c, store=store_missing_a_chunk(c)),
                                ("chunk(s) the manifest records are missing, e.g. train/labels/c/1",), no_student),
    "store-non-finite-values": Case(lambda c: distill_args(c, store=store_with_values(c, "train/logits/c/1/0",
                                                                                       (64, 2), "float32", np.nan)),
                                    ("chunk train/logits/c/1/0 holds 1 non-finite value(s)",), no_student),
    "store-label-out-of-range": Case(lambda c: distill_args(c, store=store_with_values(c, "validation/labels/c/0",
                                                                                        (48,), "int64", -100)),
                                     ("chunk validation/labels/c/0 holds labels outside [0, 2) (e.g. -100)",),
                                     no_student),
    "unparseable-number": Case(lambda c: distill_args(c, "--epochs", "abc"),
                               ("Invalid value for '--epochs'", "distill --help"), no_student, subprocess=True),
    "dump-max-seq-length-too-short": Case(lambda c: dump_args(c, "--max-seq-length", "1"),
                                          ("--max-seq-length 1 is too short", "use --max-seq-length 3 or more"),
                                          no_store),
    "distill-learning-rate-nan": Case(lambda c: distill_args(c, "--learning-rate", "nan"),
                                      ("--learning-rate must be a finite number > 0, got nan",), no_student),
    "distill-device-unavailable": Case(lambda c: distill_args(c, "--device", "cuda:7"), ("--device cuda",),
                                       no_student, doc_until="--device cuda"),
    "distill-output-exists": Case(lambda c: ["distill", "--store", c.store, "--output-dir", existing_dir(c, "student"),
                                             "--student-layers", "2", "--student-init", c.backbone],
                                  ("already exists and is not empty", "--overwrite"), untouched),
    "remote-unreachable": Case(lambda c: distill_args(c, store="http://127.0.0.1:9/sst2.zarr"),
                               ("cannot reach http://127.0.0.1:9/sst2.zarr",), no_student),
    "remote-unknown-scheme": Case(lambda c: distill_args(c, store="nosuch://bucket/sst2.zarr"),
                                  ("cannot open nosuch://bucket/sst2.zarr", "no filesystem for nosuch://"),
                                  no_student),
    "dump-add-split-held": Case(lambda c: dump_args(c, "--add-split", "validation", out=copy_store(c, True)),
                                ("already holds split 'validation'",), untouched),
    "dump-add-split-overwrite": Case(lambda c: dump_args(c, "--add-split", "validation", "--overwrite",
                                                         out=copy_store(c, True)),
                                     ("--add-split extends a complete store; it cannot be combined with --resume or "
                                      "--overwrite",), untouched),
    "sweep-bad-grid": Case(lambda c: ["sweep", "--store", c.store, "--output-dir", c.tmp / "runs", "--student-init",
                                      c.backbone, "--grid", "alpha 0.5"], ("expected NAME=V1,V2",),
                           subprocess=True),
    "dump-resume-other-settings": Case(lambda c: dump_args(c, "--resume", "--dtype", "int8",
                                                           out=copy_store(c, complete=False)),
                                       ("cannot resume", "differs in", "dtype"), untouched),
}


def empty_files(c: Ctx) -> Path:
    folder = c.tmp / "d"
    folder.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("")
    return folder


def empty_cache(c: Ctx) -> Path:
    """A team cache (store/cache.py) holding no store."""
    (c.tmp / "cache").mkdir()
    return c.tmp / "cache"


def not_a_model(c: Ctx) -> Path:
    """A T5 (encoder-decoder) checkpoint folder: not a BERT-style sequence-classification encoder."""
    folder = c.tmp / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                                                    "d_model": 8, "num_layers": 1, "num_heads": 1, "d_ff": 8,
                                                    "d_kv": 8, "vocab_size": 32}))
    return folder


def newer_format_store(c: Ctx) -> Path:
    dst = copy_store(c, complete=True)
    meta = json.loads((dst / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (dst / "zarr.json").write_text(json.dumps(meta))
    return dst


def store_without_manifest(c: Ctx) -> Path:
    """What a store of pkd-cache 0.1.0 looks like, or one whose manifest was removed to get past the checksums."""
    dst = copy_store(c, complete=True)
    edit_attributes(dst, lambda m: m.pop("checksums"))
    (dst / "checksums.json").unlink()
    c.state["digest"] = tree_digest(dst)
    return dst


def altered_store(c: Ctx) -> Path:
    dst = copy_store(c, complete=True)
    edit_array(dst, "train/logits", lambda d: d.update(data_type="float64"))
    c.state["digest"] = tree_digest(dst)
    return dst


def store_missing_a_chunk(c: Ctx) -> Path:
    dst = copy_store(c, complete=True)
    (dst / "train" / "labels" / "c" / "1").unlink()
    c.state["digest"] = tree_digest(dst)
    return dst


def store_with_values(c: Ctx, key: str, shape: tuple, dtype: str, value) -> Path:
    """A chunk with one bad value, re-encoded and its checksum recomputed: only the value check can tell."""
    dst = copy_store(c, complete=True)
    values = decode(dst / key, shape, dtype)
    values.reshape(-1)[3] = value
    rewrite_chunk(dst, key, values)
    c.state["digest"] = tree_digest(dst)
    return dst


def corrupt_store(c: Ctx) -> Path:
    dst = copy_store(c, complete=True)
    for chunk in (dst / "train" / "cls" / "c" / "0").rglob("0"):
        if chunk.is_file():
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0xFF
            chunk.write_bytes(bytes(data))
    return dst


class Ahead:
    """The CLI runs of the tests selected in this module, started ahead in a small pool; each test waits only for
    its own, and a run nobody started ahead runs when its test asks for it."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers)
        self.futures: dict[str, Future] = {}
        self.cases: dict[str, tuple[Ctx, subprocess.CompletedProcess]] = {}  # the bad inputs run so far

    def start(self, key: str, run: Callable, *args) -> None:
        self.futures[key] = self.pool.submit(run, *args)

    def result(self, key: str, run: Callable, *args):
        future = self.futures.pop(key, None)
        return future.result() if future is not None else run(*args)


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir, backbone_dir, teacher_dir, store_path) -> Callable[[str], Ctx]:
    """`world(case)`: a fresh Ctx for a bad-input case."""
    root = tmp_path_factory.mktemp("cli")
    teacher3 = make_bert(root / "teacher3", layers=2, head=True, num_labels=3)

    def ctx(name: str) -> Ctx:
        (root / name).mkdir()
        return Ctx(root / name, data_dir, backbone_dir, teacher_dir, teacher3, store_path)

    return ctx


def runs_in_subprocess(case: Case) -> bool:
    return case.subprocess or ALL_IN_SUBPROCESS


@pytest.fixture(scope="module")
def ahead(request, tmp_path_factory, data_dir, backbone_dir):
    """Starts the processes of the tests selected in this module, the longest chain first (with `-k one_case`: one)."""
    selected = {item.name for item in request.session.items if getattr(item, "module", None) is request.module}
    cases = list(CASES) if "test_errors_doc_lists_every_bad_input_with_its_exact_message" in selected else \
        [n for n in CASES if f"test_bad_input[{n}]" in selected]
    runs = Ahead(WORKERS)
    try:
        root = tmp_path_factory.mktemp("cli-runs")
        if "test_end_to_end" in selected:
            (root / "e2e").mkdir()
            runs.start("pipeline", run_pipeline, root / "e2e", backbone_dir, data_dir)
        if "test_debug_shows_the_traceback" in selected:
            runs.start("debug", cli, "--debug", "info", root / "nothing.zarr")
        world = request.getfixturevalue("world") if cases else None
        for name in cases:
            if runs_in_subprocess(CASES[name]):
                c = world(name)
                runs.start(name, lambda c, args: (c, cli(*args, env=case_env(c))), c, CASES[name].setup(c))
        yield runs
    finally:
        runs.pool.shutdown(cancel_futures=True)


def case_env(c: Ctx) -> dict:
    """A case's own user cache (fine-tuned teachers), so its check can see whether it wrote one."""
    return {"PKD_CACHE_HOME": str(c.tmp / "home")}


def run_case(ahead: Ahead, world, name: str) -> tuple[Ctx, subprocess.CompletedProcess]:
    """The case's Ctx and finished command: started ahead, or run now (in this process unless it must not be)."""
    if name not in ahead.cases:
        def now() -> tuple[Ctx, subprocess.CompletedProcess]:
            c = world(name)
            args = CASES[name].setup(c)
            return c, (cli if runs_in_subprocess(CASES[name]) else cli_in_process)(*args, env=case_env(c))

        ahead.cases[name] = ahead.result(name, now)
    return ahead.cases[name]


def test_end_to_end(ahead, tmp_path, data_dir, backbone_dir):
    pipe = ahead.result("pipeline", run_pipeline, tmp_path, backbone_dir, data_dir)
    res = pipe["results"]
    for step in ("finetune", "dump", "info", "distill", "eval"):
        assert step in res, f"{step} not run: a step it needs failed"
        assert res[step].returncode == 0, f"{step}: {show(res[step])}"
        assert "Traceback" not in res[step].stderr and "error:" not in res[step].stderr, show(res[step])

    teacher = pipe["teacher"]
    for name in ("model.safetensors", "config.json", "metrics.json", "pkd_cache_finetune.json"):
        assert (teacher / name).is_file(), name
    m = json.loads((teacher / "metrics.json").read_text())
    assert m["task"] == "sst2" and m["steps"] == 3 and 0 <= m["best_validation_accuracy"] <= 1
    assert json.loads((teacher / "pkd_cache_finetune.json").read_text())["base_model"] == str(backbone_dir)
    config = json.loads((teacher / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 2

    store = pipe["store"]
    a = attributes(store)
    assert a["complete"] is True and a["format"] == "pkd-cache"
    assert a["teacher"]["name_or_path"] == str(teacher) and a["teacher"]["base_model"] == str(backbone_dir)
    assert a["teacher"]["num_layers"] == 4 and a["max_seq_length"] == 24
    assert {s: v["num_examples"] for s, v in a["splits"].items()} == {"train": 160, "validation": 48}
    cls = json.loads((store / "train" / "cls" / "zarr.json").read_text())
    assert cls["shape"] == [160, 5, 32] and cls["data_type"] == "float16"
    assert json.loads((store / "train" / "labels" / "zarr.json").read_text())["chunk_grid"]["configuration"][
        "chunk_shape"] == [64]
    assert not (Path(os.environ["PKD_CACHE_HOME"]) / "teachers").exists()  # a trained head: no fine-tune by dump

    info = res["info"].stdout
    assert str(teacher) in info and "4 layers, hidden 32" in info and str(backbone_dir) in info
    cells = ([x.strip() for x in re.split(r"\s{2,}|[│┃]", line.strip()) if x.strip()] for line in info.splitlines())
    rows = {row[0]: row[1:] for row in cells if row}  # "complete" -> ["yes"], "train" -> ["160", source, ...]
    assert rows["complete"][0] == "yes"
    assert rows["train"][0] == "160" and rows["validation"][0] == "48"

    student = pipe["student"]
    for name in ("model.safetensors", "config.json", "metrics.json", "tokenizer.json"):
        assert (student / name).is_file(), name
    sm = json.loads((student / "metrics.json").read_text())
    assert sm["student_layers"] == 2 and sm["layer_map"] == [2] and sm["student_init"] == str(backbone_dir)
    assert sm["steps"] == 5 and sm["best_epoch"] == 1  # 160 examples / batch 32, one epoch
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2

    scores = json.loads(res["eval"].stdout)
    assert set(scores) == {"validation_accuracy"} and 0 <= scores["validation_accuracy"] <= 1
    # the same 48 dev examples (none longer than 24 tokens), from raw text instead of the store: the same score
    assert scores["validation_accuracy"] == pytest.approx(sm["best_validation_accuracy"])
    assert json.loads((student / "eval_results.json").read_text())["validation_accuracy"] == \
        scores["validation_accuracy"]
    table = res["eval_table"]  # for people: a table, progress, and where the scores went
    assert f"validation_accuracy │ {scores['validation_accuracy']:.4f}" in table.stdout, show(table)
    said = " ".join(table.stderr.split())
    assert "scoring validation: 1 batch" in said and f"wrote {student / 'eval_results.json'}" in said, show(table)


def assert_user_error(p: subprocess.CompletedProcess, expect: tuple[str, ...]) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 2, show(p)  # 2: bad input; 1 would be "internal error" (a bug)
    assert "Traceback" not in out, show(p)
    assert "internal error" not in out, show(p)
    lines = [line for line in out.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, show(p)
    assert lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1, show(p)
    for fragment in expect:
        assert fragment in out, f"{fragment!r} not in the message\n{show(p)}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(ahead, world, name):
    c, p = run_case(ahead, world, name)
    case = CASES[name]
    assert_user_error(p, case.expect)
    if case.check:
        case.check(c)


def test_debug_shows_the_traceback(ahead, tmp_path):
    p = ahead.result("debug", cli, "--debug", "info", tmp_path / "nothing.zarr")
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "PkdCacheError" in p.stderr and "does not exist" in p.stderr


def test_debug_is_per_invocation(tmp_path):
    """`--debug` in one in-process run (a notebook, a test) must not leave tracebacks on for the next."""
    first = cli_in_process("--debug", "info", tmp_path / "nothing.zarr")
    assert first.returncode != 0
    assert "Traceback" in first.stderr
    second = cli_in_process("info", tmp_path / "nothing.zarr")
    assert second.returncode == 2 and "Traceback" not in second.stderr, show(second)
    assert second.stderr.startswith("error: store ") and "does not exist" in second.stderr


ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"
DOC_ROW = re.compile(r"^\| `(?P<id>[a-z0-9-]+)` \| (?P<what>.*?) \| `` (?P<message>.*) `` \|$")


def documented_message(c: Ctx, p: subprocess.CompletedProcess, case: Case) -> str:
    """The error line with this run's folders replaced by placeholders (as docs/ERRORS.md shows it)."""
    line = next((x for x in p.stderr.splitlines() if x.startswith("error: ")), "")[len("error: "):]
    for path, name in ((c.tmp, "<case>"), (c.teacher3, "<teacher3>"), (c.store, "<store>"), (c.teacher, "<teacher>"),
                       (c.backbone, "<backbone>"), (c.data, "<data>")):
        line = line.replace(str(path), name)
    if case.doc_until and case.doc_until in line:
        line = line[:line.index(case.doc_until) + len(case.doc_until)] + " …"
    return line


def test_errors_doc_lists_every_bad_input_with_its_exact_message(ahead, world):
    """docs/ERRORS.md and the CLI agree: every case is documented with the message the command really prints
    (the cases run by test_bad_input are not run again)."""
    actual = {n: documented_message(*run_case(ahead, world, n), CASES[n]) for n in CASES}
    rows = {m["id"]: m for m in map(DOC_ROW.match, ERRORS_DOC.read_text().splitlines()) if m}
    if os.environ.get("PKD_CACHE_WRITE_ERRORS_DOC"):
        head = ERRORS_DOC.read_text().split("\n| id |")[0]
        table = ["| id | bad input | message (after `error: `) |", "|---|---|---|"]
        table += [f"| `{n}` | {rows[n]['what'] if n in rows else 'TODO'} | `` {actual[n]} `` |" for n in CASES]
        ERRORS_DOC.write_text(head.rstrip() + "\n\n" + "\n".join(table) + "\n")
        rows = {m["id"]: m for m in map(DOC_ROW.match, ERRORS_DOC.read_text().splitlines()) if m}
    assert sorted(rows) == sorted(CASES), "docs/ERRORS.md and CASES list different bad inputs"
    assert len(rows) >= 20
    for n, row in rows.items():
        assert row["what"] and row["what"] != "TODO", f"{n}: describe the bad input in docs/ERRORS.md"
        assert row["message"] == actual[n], f"{n}: docs/ERRORS.md says\n  {row['message']}\nthe CLI says\n  {actual[n]}"
