"""Distillation from a store alone: no teacher, student init, saving, determinism, learning."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pkd_cache
from pkd_cache.errors import PkdCacheError
from pkd_cache.testing import make_bert


def _cfg(store, out, init, **kw):
    train = pkd_cache.TrainConfig(epochs=kw.pop("epochs", 1), learning_rate=kw.pop("lr", 1e-3),
                                  batch_size=16, seed=kw.pop("seed", 0), logging_steps=0)
    return pkd_cache.DistillConfig(store=None if store is None else str(store), output_dir=str(out),
                                   student_init=str(init), train=train, **kw)


def test_distill_never_needs_the_teacher(tmp_path, teacher_dir, backbone_dir, data_dir, monkeypatch):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    store = tmp_path / "s.zarr"
    pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(data_dir), out=str(store),
                                        max_seq_length=24, chunk_size=64))
    shutil.rmtree(teacher)  # deleting the teacher after the dump must not matter
    from transformers import AutoModelForSequenceClassification as Auto

    seen, real = [], Auto.from_pretrained.__func__
    monkeypatch.setattr(Auto, "from_pretrained", classmethod(lambda cls, name, *a, **k: seen.append(str(name))
                                                             or real(cls, name, *a, **k)))
    m = pkd_cache.distill(_cfg(store, tmp_path / "student", backbone_dir, student_layers=2))
    assert seen == [str(backbone_dir)]  # the only model built is the student
    assert m["layer_map"] == [2] and 0 <= m["best_validation_accuracy"] <= 1
    saved = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert saved["best_epoch"] == 1 and saved["history"][0]["validation_accuracy"] == m["best_validation_accuracy"]


def test_student_is_first_k_layers_of_init_with_a_new_head(tmp_path, store_path, teacher_dir):
    out = tmp_path / "student"
    pkd_cache.distill(_cfg(store_path, out, teacher_dir, student_layers=2, lr=1e-12, epochs=1, beta=0.0))
    student = load_file(str(out / "model.safetensors"))
    init = load_file(str(teacher_dir / "model.safetensors"))
    assert not any(k.startswith("bert.encoder.layer.2.") for k in student)
    for k, v in student.items():
        if k.startswith("bert.") and "encoder.layer.1." in k:  # a copied layer, (almost) untouched at lr 1e-12
            torch.testing.assert_close(v, init[k], atol=1e-6, rtol=0)
    assert not torch.allclose(student["classifier.weight"], init["classifier.weight"])  # new head


def test_saved_student_works_with_a_transformers_pipeline(tmp_path, store_path, backbone_dir):
    from transformers import pipeline

    out = tmp_path / "student"
    pkd_cache.distill(_cfg(store_path, out, backbone_dir, student_layers=2))
    clf = pipeline("text-classification", model=str(out), device="cpu")
    pred = clf("the film is good")[0]
    assert pred["label"] in ("negative", "positive") and 0 <= pred["score"] <= 1


def test_same_seed_same_student_other_seed_other_student(tmp_path, store_path, backbone_dir):
    def weights(seed, name):
        pkd_cache.distill(_cfg(store_path, tmp_path / name, backbone_dir, student_layers=2, seed=seed, beta=1.0))
        return load_file(str(tmp_path / name / "model.safetensors"))

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fine_tuning_from_the_store_learns_the_task(tmp_path, store_path, backbone_dir):
    # alpha = beta = 0: plain fine-tuning; the synthetic task is separable by one sentiment word per sentence
    m = pkd_cache.distill(_cfg(store_path, tmp_path / "ft", backbone_dir, student_layers=2, alpha=0.0, beta=0.0,
                               epochs=8, lr=3e-3))
    assert m["best_validation_accuracy"] >= 0.8


def test_bad_inputs_are_one_line_errors(tmp_path, store_path, backbone_dir):
    with pytest.raises(PkdCacheError, match="deeper"):
        pkd_cache.distill(_cfg(store_path, tmp_path / "x1", backbone_dir, student_layers=5))
    with pytest.raises(PkdCacheError, match="out of range"):
        pkd_cache.distill(_cfg(store_path, tmp_path / "x2", backbone_dir, student_layers=3, layer_map=[1, 9]))
    other_vocab = make_bert(tmp_path / "other", layers=2)
    (other_vocab / "tokenizer.json").write_text((other_vocab / "tokenizer.json").read_text().replace('"good"', '"goood"'))
    with pytest.raises(PkdCacheError, match="tokenizer"):
        pkd_cache.distill(_cfg(store_path, tmp_path / "x3", other_vocab, student_layers=2))
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(PkdCacheError, match="already exists"):
        pkd_cache.distill(_cfg(store_path, out, backbone_dir, student_layers=2))
    assert (out / "keep.txt").read_text() == "x"


def test_dump_fine_tunes_a_headless_teacher_and_distill_defaults_to_its_base(tmp_path, backbone_dir, data_dir):
    store = tmp_path / "auto.zarr"
    cfg = pkd_cache.DumpConfig(teacher=str(backbone_dir), task="sst2", data_dir=str(data_dir), out=str(store),
                               max_seq_length=24, finetune=False)
    with pytest.raises(PkdCacheError, match="no trained sst2 head"):
        pkd_cache.dump(cfg)
    assert not store.exists()
    cfg.finetune = True
    cfg.finetune_train = pkd_cache.TrainConfig(epochs=1, learning_rate=1e-3, logging_steps=0)
    s = pkd_cache.dump(cfg)
    teacher = s.info()["teacher"]
    tuned = Path(teacher["finetuned_by_dump"])  # a cache entry of its own: $PKD_CACHE_HOME/teachers/<task>/...
    assert tuned.parent == Path(os.environ["PKD_CACHE_HOME"]) / "teachers" / "sst2"
    assert tuned.name == f"{backbone_dir.name}-{teacher['finetuned_id']}" and (tuned / "model.safetensors").is_file()
    assert teacher["base_model"] == str(backbone_dir)
    m = pkd_cache.distill(pkd_cache.DistillConfig(store=str(store), output_dir=str(tmp_path / "st"), student_layers=2,
                                                  train=pkd_cache.TrainConfig(epochs=1, logging_steps=0)))
    assert m["student_init"] == str(backbone_dir)

    # the same dump again is a cache hit: the head loading initialises at random is not part of the key
    assert pkd_cache.dump(cfg).info()["completed_at"] == s.info()["completed_at"]
    # another store (another folder and format) from the same teacher and data reuses the fine-tuned teacher
    weights = (tuned / "model.safetensors").read_bytes()
    cfg.out, cfg.format = str(tmp_path / "auto.arrow"), "arrow"
    again = pkd_cache.dump(cfg)
    assert (tuned / "model.safetensors").read_bytes() == weights
    assert again.info()["teacher"]["weights_fingerprint"] == teacher["weights_fingerprint"]
    assert again.info()["teacher"]["finetuned_by_dump"] == str(tuned)
    # other fine-tuning settings make another teacher, beside the first
    cfg.out, cfg.finetune_train = str(tmp_path / "auto2.zarr"), pkd_cache.TrainConfig(epochs=1, learning_rate=2e-3,
                                                                                       logging_steps=0)
    other = Path(pkd_cache.dump(cfg).info()["teacher"]["finetuned_by_dump"])
    assert other != tuned and other.parent == tuned.parent and (tuned / "model.safetensors").read_bytes() == weights


def test_a_student_of_another_width_learns_a_projection_that_is_not_saved(tmp_path, store_path):
    """A 48-wide student of a 32-wide teacher: its CLS is projected to 32 for the patient loss."""
    from safetensors.torch import load_file

    wide = make_bert(tmp_path / "wide", layers=2, hidden=48)
    m = pkd_cache.distill(_cfg(store_path, tmp_path / "s", wide, student_layers=2, beta=5.0))
    assert m["cls_projection"] == [48, 32]
    saved = load_file(tmp_path / "s" / "model.safetensors")
    assert not any("projection" in k for k in saved)
    plain = load_file(pkd_cache.distill(_cfg(store_path, tmp_path / "b0", wide, student_layers=2, beta=0.0))
                      and tmp_path / "b0" / "model.safetensors")
    assert any(not torch.equal(saved[k], plain[k]) for k in saved)  # the patient loss, through the projection, acted
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 2


def test_students_in_one_pass_train_exactly_as_alone(tmp_path, store_path, backbone_dir):
    """distill_many reads each batch once for all; every student ends bit-identical to its own separate run."""
    from safetensors.torch import load_file

    variants = [dict(student_layers=2, alpha=0.5), dict(student_layers=3, strategy="last", alpha=0.7, beta=2.0),
                dict(student_layers=2, alpha=0.0, beta=0.0, temperature=5.0)]
    alone = [pkd_cache.distill(_cfg(store_path, tmp_path / f"alone{i}", backbone_dir, epochs=2, **v))
             for i, v in enumerate(variants)]
    together = pkd_cache.distill_many([_cfg(store_path, tmp_path / f"pass{i}", backbone_dir, epochs=2, **v)
                                       for i, v in enumerate(variants)])
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a["history"] == b["history"] and a["layer_map"] == b["layer_map"]
        wa, wb = load_file(tmp_path / f"alone{i}" / "model.safetensors"), load_file(tmp_path / f"pass{i}" / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(PkdCacheError, match="must share"):
        pkd_cache.distill_many([_cfg(store_path, tmp_path / "m1", backbone_dir, seed=1),
                                _cfg(store_path, tmp_path / "m2", backbone_dir, seed=2)])


def test_online_kd_sees_the_store_batches_and_agrees_with_it(tmp_path, store_path, teacher_dir, data_dir,
                                                              backbone_dir):
    """distill --teacher (no store): the same batches in the same order, the teacher run on each; the student
    matches the one trained from the store up to float16 storage of the CLS vectors."""
    from pkd_cache.online import OnlineSource
    from pkd_cache.sources import BatchSource

    source = OnlineSource(str(teacher_dir), "sst2", str(data_dir), 24, 64, torch.device("cpu"))
    store = pkd_cache.open_store(str(store_path))
    assert isinstance(source, BatchSource) and isinstance(store, BatchSource)  # distill takes either
    for a, b in zip(source.batches("train", 16, seed=3, epoch=1, layers=[2, 4], fields=pkd_cache.store.ARRAYS),
                    store.batches("train", 16, seed=3, epoch=1, layers=[2, 4]), strict=True):
        for k in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a[k].long(), b[k].long())
        torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["cls"], b["cls"].float(), rtol=0, atol=5e-3)  # float16 in the store
    online = pkd_cache.distill(_cfg(None, tmp_path / "online", backbone_dir, student_layers=2, teacher=str(teacher_dir),
                                    task="sst2", data_dir=str(data_dir), max_seq_length=24, chunk_size=64))
    cached = pkd_cache.distill(_cfg(store_path, tmp_path / "cached", backbone_dir, student_layers=2))
    assert online["online_teacher"] == str(teacher_dir) and online["layer_map"] == cached["layer_map"]
    assert abs(online["best_validation_accuracy"] - cached["best_validation_accuracy"]) <= 2 / 48
    with pytest.raises(PkdCacheError, match="not both or neither"):
        pkd_cache.distill(_cfg(store_path, tmp_path / "both", backbone_dir, teacher=str(teacher_dir), task="sst2"))
    with pytest.raises(PkdCacheError, match="no trained sst2 head"):
        pkd_cache.distill(_cfg(None, tmp_path / "x", backbone_dir, teacher=str(backbone_dir), task="sst2",
                               data_dir=str(data_dir)))
