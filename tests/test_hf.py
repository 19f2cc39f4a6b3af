"""pkd_cache.hf: a store as a torch Dataset (also under DataLoader workers), its batches equal to `pkd-cache
distill`'s, and a transformers Trainer whose losses and weights equal `pkd-cache distill`'s."""
import pytest
import torch

import pkd_cache
from pkd_cache.hf import StoreCollator, StoreDataset, StoreSampler

LAYERS = [1, 3]


def loader(store_path, batch_size=32, workers=0, epoch=0):
    ds = StoreDataset(str(store_path), "train", ("logits", "cls"), LAYERS)
    sampler = StoreSampler(ds, seed=0)
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=StoreCollator(),
                                       num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_batches_are_pkd_cache_distills_batches(store_path, workers):
    """The same rows in the same order, the same dynamic padding, the same values: with 2 worker processes too
    (each opens the store itself)."""
    store = pkd_cache.open_store(str(store_path))
    for epoch in (0, 1):
        ours = list(store.batches("train", 32, shuffle=True, seed=0, epoch=epoch, layers=LAYERS))
        theirs = list(loader(store_path, 32, workers, epoch))
        assert len(ours) == len(theirs) == 5
        for a, b in zip(ours, theirs):
            for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
                assert torch.equal(a[k].long() if k != "labels" else a[k], b[k]), k
            assert torch.equal(a["logits"], b["teacher_logits"]) and torch.equal(a["cls"], b["teacher_cls"])


def test_a_dataset_row_and_its_bad_input(store_path):
    ds = StoreDataset(str(store_path), "validation", ("logits",))
    row = ds[3]
    store = pkd_cache.open_store(str(store_path))
    assert int(row["labels"]) == int(store.read("validation", 3, 4)["labels"][0]) and "teacher_cls" not in row
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(pkd_cache.errors.PkdCacheError, match="need the teacher layers"):
        StoreDataset(str(store_path), "train", ("cls",))


def test_the_trainer_trains_the_student_pkd_cache_distill_trains(store_path, backbone_dir, tmp_path, monkeypatch):
    """Dropout is off in these models. One epoch of 160 examples in batches of 8 (20 steps), lr 1e-3 decaying
    linearly, no warm-up: the Trainer's PKD losses at each step, and its final weights, equal `pkd-cache distill`'s
    within 1e-5."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    import pkd_cache.hf as hf
    from pkd_cache.commands import pass_student
    from pkd_cache.data.tasks import get_task
    from pkd_cache.student.init import build_student

    losses = {"distill": [], "trainer": []}

    def recorded(key, fn):
        def loss(*a, **k):
            total, parts = fn(*a, **k)
            losses[key].append(float(total.detach()))
            return total, parts
        return loss

    monkeypatch.setattr(pass_student, "pkd_loss", recorded("distill", pass_student.pkd_loss))
    pkd_cache.distill(pkd_cache.DistillConfig(
        store=str(store_path), output_dir=str(tmp_path / "distill"), student_layers=2, student_init=str(backbone_dir),
        train=pkd_cache.TrainConfig(epochs=1, learning_rate=1e-3, batch_size=8, warmup_ratio=0, logging_steps=0)))

    store = pkd_cache.open_store(str(store_path))
    torch.manual_seed(0)  # as `pkd-cache distill` builds its student
    student = build_student(str(backbone_dir), get_task("sst2"), 2, store.meta.tokenizer.vocab_fingerprint).model
    monkeypatch.setattr(hf, "pkd_loss", recorded("trainer", hf.pkd_loss))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=1e-3, weight_decay=0.01, warmup_steps=0, lr_scheduler_type="linear",
                             max_grad_norm=1.0, seed=0, logging_steps=5, report_to=[], save_strategy="no",
                             eval_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = hf.DistillationTrainer(model=student, args=args, store=str(store_path), alpha=0.5, temperature=10.0)
    trainer.train()

    assert len(losses["distill"]) == len(losses["trainer"]) == 20
    assert max(abs(a - b) for a, b in zip(losses["distill"], losses["trainer"])) < 1e-5, losses
    assert losses["trainer"][-1] < losses["trainer"][0]  # it trained
    ours, theirs = load_file(str(tmp_path / "distill" / "model.safetensors")), student.state_dict()
    assert max(float((ours[k] - theirs[k].cpu()).abs().max()) for k in ours) < 1e-5


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_to_hf_dataset_copies_nothing_into_the_hf_cache(teacher_dir, data_dir, tmp_path, monkeypatch, fmt):
    """An Arrow store's shards are the dataset's own files; a Zarr store's split is built in memory. Neither
    writes to the HF datasets cache, and the values are the store's."""
    import numpy as np
    from pkd_cache.testing import cli_in_process, show

    hf_cache = tmp_path / "hf_cache"
    hf_cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    out = tmp_path / f"s.{fmt}"
    p = cli_in_process("dump", "--teacher", teacher_dir, "--task", "sst2", "--data-dir", data_dir, "--out", out,
                       "--format", fmt, "--max-seq-length", "24", "--chunk-size", "64")
    assert p.returncode == 0, show(p)
    store = pkd_cache.open_store(str(out))
    ds = store.to_hf_dataset("train")
    assert len(ds) == store.num_examples("train") == 160
    rows = ds.with_format("numpy")[:]
    want = store.read("train", 0, 160)
    assert np.array_equal(rows["input_ids"], want["input_ids"]) and np.array_equal(rows["labels"], want["labels"])
    assert np.array_equal(rows["cls_2"].astype(np.float16), want["cls"][:, 2])
    if fmt == "arrow":
        assert {f["filename"] for f in ds.cache_files} == {str(p) for p in (out / "train").glob("*.arrow")}
    assert not any(hf_cache.rglob("*")), list(hf_cache.rglob("*"))


def test_to_hf_dataset_refuses_a_tampered_shard(teacher_dir, data_dir, tmp_path):
    from pkd_cache.testing import cli_in_process

    out = tmp_path / "s.arrow"
    assert cli_in_process("dump", "--teacher", teacher_dir, "--task", "sst2", "--data-dir", data_dir, "--out", out,
                          "--format", "arrow", "--max-seq-length", "24", "--chunk-size", "64").returncode == 0
    shard = out / "train" / "00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(pkd_cache.errors.PkdCacheError, match="00001.arrow"):
        pkd_cache.open_store(str(out)).to_hf_dataset("train")


@pytest.mark.slow
def test_the_trainer_example_runs_as_written(store_path, backbone_dir, tmp_path):
    """examples/hf_trainer.py, unchanged, on the tests' tiny store: it trains and saves a student that loads."""
    import subprocess
    import sys
    from pathlib import Path

    from pkd_cache.testing import cli_env
    from transformers import AutoModelForSequenceClassification

    pytest.importorskip("accelerate")
    script = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    out = tmp_path / "student"
    r = subprocess.run([sys.executable, str(script), "--store", str(store_path), "--student-init", str(backbone_dir),
                        "--student-layers", "2", "--output-dir", str(out), "--max-steps", "3"],
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 2


def test_a_student_folder_has_a_model_card_the_hub_reads(store_path, backbone_dir, tmp_path):
    """README.md with the hub's metadata (base model, dataset, the best dev metric as a model-index result), the
    distillation settings and the store's cache key; huggingface_hub parses it."""
    import json

    from huggingface_hub import ModelCard
    from pkd_cache.testing import cli_in_process, show

    out = tmp_path / "student"
    p = cli_in_process("distill", "--store", store_path, "--student-init", backbone_dir, "--student-layers", "2",
                       "--max-steps", "3", "--output-dir", out)
    assert p.returncode == 0, show(p)
    card = ModelCard.load(out / "README.md")
    m = json.loads((out / "metrics.json").read_text())
    assert card.data.base_model == str(backbone_dir)
    (result,) = card.data.eval_results
    assert (result.metric_type, result.dataset_type, result.dataset_config, result.dataset_split) == \
        ("accuracy", "glue", "sst2", "validation")
    assert result.metric_value == round(m["best_validation_accuracy"], 4)
    key = pkd_cache.open_store(str(store_path)).info()["cache_key"]
    assert f"cache key `{key}`" in card.text and "| alpha (KD weight) | 0.5 |" in card.text


@pytest.mark.slow
@pytest.mark.distributed
def test_the_trainer_example_under_torchrun_shards_the_batches(store_path, backbone_dir, tmp_path):
    """examples/hf_trainer.py under torchrun with 2 CPU ranks (gloo): each rank trains on its own batches of the
    one StoreSampler order (the Trainer's batch sharding), not both on the same."""
    import subprocess
    import sys
    from pathlib import Path

    from pkd_cache.testing import cli_env

    pytest.importorskip("accelerate")
    script = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    probe = tmp_path / "probe.py"  # the example, each rank noting its batches (a sum of their ids) in a file
    probe.write_text(
        "import os, sys\nimport pkd_cache.hf as hf\norig = hf.DistillationTrainer.compute_loss\n"
        "def loss(self, model, inputs, *a, **k):\n"
        f"    with open(os.path.join({str(tmp_path)!r}, 'batches.' + os.environ['RANK']), 'a') as f:\n"
        "        f.write(f\"{os.environ['RANK']} {self.args.world_size} {int(inputs['input_ids'].sum())}\\n\")\n"
        "    return orig(self, model, inputs, *a, **k)\n"
        f"hf.DistillationTrainer.compute_loss = loss\nexec(open({str(script)!r}).read())\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(probe), "--store", str(store_path), "--student-init", str(backbone_dir),
                        "--student-layers", "2", "--output-dir", str(tmp_path / "student"), "--max-steps", "2"],
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [line.split() for rank in (0, 1) for line in (tmp_path / f"batches.{rank}").read_text().splitlines()]
    assert sorted({w for _, w, _ in seen}) == ["2"] and len(seen) == 4, r.stdout
    by_rank = {rank: [s for q, _, s in seen if q == rank] for rank in ("0", "1")}
    assert not set(by_rank["0"]) & set(by_rank["1"]), by_rank  # two ranks, different batches
