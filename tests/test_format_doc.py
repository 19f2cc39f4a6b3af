"""docs/FORMAT.md's code blocks run as written on a small store of each flavour (its paths pointed at it)."""
import re
from pathlib import Path

import numpy as np
import pytest
from pkd_cache.testing import cli_in_process, show

import pkd_cache

DOC = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, teacher_dir, data_dir):
    """`sst2.zarr` and `sst2.arrow` in one folder, as the doc names them."""
    root = tmp_path_factory.mktemp("format_doc")
    for fmt in ("zarr", "arrow"):
        p = cli_in_process("dump", "--teacher", teacher_dir, "--task", "sst2", "--data-dir", data_dir, "--out",
                           root / f"sst2.{fmt}", "--format", fmt, "--max-seq-length", "24", "--chunk-size", "64")
        assert p.returncode == 0, show(p)
    return root


def test_the_doc_has_its_three_examples():
    assert len(blocks()) == 3


@pytest.mark.parametrize("i", range(3))
def test_each_example_runs_on_a_real_store(stores, monkeypatch, i):
    monkeypatch.chdir(stores)
    scope: dict = {}
    exec(compile(blocks()[i], f"FORMAT.md block {i}", "exec"), scope)
    want = pkd_cache.open_store(str(stores / "sst2.zarr")).read("train", 0, 160)
    if "labels" in scope and "table" in scope:  # pyarrow
        assert np.array_equal(scope["labels"], want["labels"])
    if "cls2" in scope:  # datasets
        assert np.array_equal(scope["cls2"].astype(np.float16), want["cls"][:, 2])
    if "layer4" in scope:  # zarr
        assert np.array_equal(scope["layer4"][:, 0], want["cls"][:, 4])
        assert np.array_equal(scope["labels"], want["labels"])
