"""Fixtures: a tiny synthetic SST-2-like task on disk, tiny random BERTs and a tiny store (from pkd_cache.testing)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pkd_cache.progress import log_to_stderr
from pkd_cache.testing import make_bert, make_causal_lm, make_store, write_sst2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# session fixtures run before the per-test `own_caches`: they too get a user cache of their own, never ~/.cache
os.environ["PKD_CACHE_HOME"] = tempfile.mkdtemp(prefix="pkd_cache_home_")


@pytest.fixture(scope="session", autouse=True)
def log_on_stderr():
    """pkd_cache's log lines on stderr, as the CLI shows them: tests read them there (pytest's own root handlers
    would otherwise count as a user's logging configuration)."""
    log_to_stderr()


@pytest.fixture(autouse=True)
def own_caches(tmp_path_factory, monkeypatch):
    """Each test has its own user cache (fine-tuned teachers, commands/dump_teacher.py) and no team cache: neither
    the developer's nor another test's (subprocesses inherit this environment through `cli_env`)."""
    monkeypatch.setenv("PKD_CACHE_HOME", str(tmp_path_factory.mktemp("pkd_cache_home")))
    monkeypatch.delenv("PKD_CACHE", raising=False)


@pytest.fixture(scope="session")
def lm(tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 (hidden 16) with a word-level tokenizer of the synthetic task's words."""
    return make_causal_lm(tmp_path_factory.mktemp("lm") / "gpt2")


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
    return make_store(tmp_path_factory.mktemp("stores") / "sst2.zarr", teacher_dir, data_dir)
