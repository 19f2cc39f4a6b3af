"""Task metrics against scikit-learn/scipy by hand, and the content fingerprint of examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pkd_cache.data.loading import Examples, load_examples
from pkd_cache.data.metrics import compute_metrics
from pkd_cache.data.tasks import get_task
from pkd_cache.testing import write_jsonl, write_tsv

SST2 = get_task("sst2")


# --- metrics ---------------------------------------------------------------------------------------------------------

LABELS = np.array([1, 0, 1, 1, 0, 0, 1, 0])
PRED = np.array([1, 0, 0, 1, 1, 0, 1, 1])  # TP 3, TN 2, FP 2, FN 1


def logits_for(pred, num_labels=2):
    out = np.zeros((len(pred), num_labels), dtype=np.float32)
    out[np.arange(len(pred)), pred] = 1.0
    return out - 0.3 * np.arange(num_labels)  # not one-hot, still argmax = pred


def test_accuracy():
    m = compute_metrics(SST2, logits_for(PRED), LABELS)
    assert m == {"accuracy": pytest.approx(5 / 8)}


def test_accuracy_three_classes():
    y, p = np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 2, 0])
    assert compute_metrics(get_task("mnli"), logits_for(p, 3), y) == {"accuracy": pytest.approx(3 / 5)}


def test_f1_mrpc():
    m = compute_metrics(get_task("mrpc"), logits_for(PRED), LABELS)
    tp, fp, fn = 3, 2, 1
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 6/9
    from sklearn.metrics import f1_score

    assert m["f1"] == pytest.approx(f1_score(LABELS, PRED))


def test_matthews_cola():
    m = compute_metrics(get_task("cola"), logits_for(PRED), LABELS)
    tp, tn, fp, fn = 3, 2, 2, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["matthews_correlation"] == pytest.approx(mcc)  # 4 / sqrt(225) = 0.2667
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert "f1" not in m


def test_pearson_spearman_stsb():
    y = np.array([0.0, 1.5, 2.0, 3.5, 5.0], dtype=np.float32)
    p = np.array([[0.5], [1.0], [3.0], [2.5], [4.0]], dtype=np.float32)  # N x 1, as a regression head gives
    m = compute_metrics(get_task("stsb"), p, y)
    pf, yf = p.reshape(-1).astype(np.float64), y.astype(np.float64)
    pearson = ((pf - pf.mean()) * (yf - yf.mean())).sum() / math.sqrt(((pf - pf.mean()) ** 2).sum()
                                                                     * ((yf - yf.mean()) ** 2).sum())
    # ranks: y 1 2 3 4 5, p 1 2 4 3 5 -> d^2 = 2 -> rho = 1 - 6*2 / (5*24) = 0.9
    assert m == {"pearson": pytest.approx(pearson), "spearmanr": pytest.approx(0.9)}
    from scipy.stats import pearsonr

    assert m["pearson"] == pytest.approx(pearsonr(pf, yf)[0])


# --- fingerprints ----------------------------------------------------------------------------------------------------

def test_fingerprint_depends_on_content_only(tmp_path):
    rows = [("a good film ", 1), ("bad", 0), ('"quoted"', 1)]
    write_tsv(tmp_path / "tsv" / "dev.tsv", rows, header=("sentence", "label"))
    write_jsonl(tmp_path / "jsonl" / "validation.jsonl",
          [{"idx": i, "label": SST2.label_names[y], "sentence": s} for i, (s, y) in enumerate(rows)])
    a, b = (load_examples(SST2, "validation", str(tmp_path / name)) for name in ("tsv", "jsonl"))
    assert a.source != b.source
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64

    write_tsv(tmp_path / "changed" / "dev.tsv", [rows[0], (rows[1][0], 1), rows[2]], header=("sentence", "label"))
    assert load_examples(SST2, "validation", str(tmp_path / "changed")).fingerprint() != a.fingerprint()


def test_fingerprint_sees_texts_order_and_pairs():
    base = Examples(["a", "b"], None, np.array([0, 1]), "x")
    fp = base.fingerprint()
    assert Examples(["a", "b"], None, np.array([0, 1]), "elsewhere").fingerprint() == fp
    assert Examples(["a", "c"], None, np.array([0, 1]), "x").fingerprint() != fp
    assert Examples(["b", "a"], None, np.array([1, 0]), "x").fingerprint() != fp
    assert Examples(["ab", ""], None, np.array([0, 1]), "x").fingerprint() != fp
    assert Examples(["a", "b"], ["c", "d"], np.array([0, 1]), "x").fingerprint() != fp
    pair = Examples(["a", "b"], ["c", "d"], np.array([0, 1]), "x").fingerprint()
    assert Examples(["a", "b"], ["d", "c"], np.array([0, 1]), "x").fingerprint() != pair
