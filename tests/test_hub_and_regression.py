"""The hub code path (datasets.load_dataset, served from local data here) and a regression task end to end."""
import random

import numpy as np
import pytest

import pkd_cache
from pkd_cache.data.loading import load_examples
from pkd_cache.data.tasks import get_task
from pkd_cache.errors import PkdCacheError
from pkd_cache.testing import FILLER, make_bert


def test_hub_path_reads_the_glue_dataset_layout(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"premise": ["a b", "c d"], "hypothesis": ["e", "f"], "label": [2, 0],
                                           "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ex = load_examples(get_task("mnli"), "validation_mismatched", None, max_examples=2)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched[:2]")]
    assert ex.text_a == ["a b", "c d"] and ex.text_b == ["e", "f"] and ex.labels.tolist() == [2, 0]
    assert ex.source == "hub:nyu-mll/glue/mnli/validation_mismatched"


def test_hub_failure_is_one_line_with_the_way_out(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PkdCacheError, match="--data-dir") as e:
        load_examples(get_task("sst2"), "train")
    assert "\n" not in str(e.value)


def _write_stsb(folder, n, seed):
    rng = random.Random(seed)
    lines = ["sentence1\tsentence2\tlabel\tidx"]
    for i in range(n):
        a, b = " ".join(rng.choices(FILLER, k=5)), " ".join(rng.choices(FILLER, k=5))
        lines.append(f"{a}\t{b}\t{rng.uniform(0, 5):.3f}\t{i}")
    (folder / ("train.tsv" if seed == 1 else "dev.tsv")).write_text("\n".join(lines) + "\n")


def test_regression_task_dump_and_distill(tmp_path, backbone_dir):
    data = tmp_path / "STS-B"
    data.mkdir()
    _write_stsb(data, 96, 1)
    _write_stsb(data, 32, 2)
    teacher = make_bert(tmp_path / "teacher", layers=4, num_labels=1)
    store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="stsb", data_dir=str(data),
                                                out=str(tmp_path / "stsb.zarr"), max_seq_length=16))
    assert store.array("train", "labels").dtype == np.float32
    assert store.array("train", "logits").shape == (96, 1)
    m = pkd_cache.distill(pkd_cache.DistillConfig(store=str(tmp_path / "stsb.zarr"), output_dir=str(tmp_path / "s"),
                                                  student_layers=2, student_init=str(backbone_dir),
                                                  train=pkd_cache.TrainConfig(epochs=1, logging_steps=0)))
    assert "best_validation_pearson" in m and "validation_spearmanr" in m["history"][0]
