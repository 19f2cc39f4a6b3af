"""Fixtures: a tiny synthetic SST-2-like task on disk, and tiny random BERTs built from a BertConfig."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "glue"
POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "a", "film", "movie", "story", "plot", "is", "was", "very", "quite", "and", "but", "acting", "music"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def synthetic_rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(2, 12)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_sst2(folder: Path, n_train: int = 160, n_dev: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in synthetic_rows(n, seed)]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def make_tokenizer(folder: Path):
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("data") / "SST-2")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A 4-layer 'fine-tuned' teacher: random, but with a classification head for 2 labels."""
    return make_bert(tmp_path_factory.mktemp("teacher"), layers=4, head=True, seed=0)


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    """A 4-layer 'pretrained' backbone without a head (the students' init)."""
    return make_bert(tmp_path_factory.mktemp("backbone"), layers=4, head=False, seed=1)


@pytest.fixture(scope="session")
def store_path(tmp_path_factory, teacher_dir, data_dir) -> Path:
    import pkd_cache

    out = tmp_path_factory.mktemp("stores") / "sst2.zarr"
    pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir), out=str(out),
                                        max_seq_length=24, batch_size=16, chunk_size=64))
    return out
