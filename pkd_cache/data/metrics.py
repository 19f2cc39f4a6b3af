"""Task metrics from scikit-learn and scipy, as in the GLUE benchmark."""
from __future__ import annotations

import numpy as np

from .tasks import TaskSpec


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`predictions` are logits (N x C) for classification, scores (N or N x 1) for regression."""
    if task.is_regression:
        from scipy.stats import pearsonr, spearmanr

        p = np.asarray(predictions, dtype=np.float64).reshape(-1)
        y = np.asarray(labels, dtype=np.float64)
        return {"pearson": float(pearsonr(p, y)[0]), "spearmanr": float(spearmanr(p, y)[0])}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred = np.asarray(predictions).argmax(axis=-1)
    out = {"accuracy": float(accuracy_score(labels, pred))}
    if task.metric == "f1":
        out["f1"] = float(f1_score(labels, pred))
    if task.metric == "matthews":
        out["matthews_correlation"] = float(matthews_corrcoef(labels, pred))
    return out


def metric_names(task: TaskSpec) -> tuple[str, ...]:
    """The metrics `compute_metrics` reports for `task`."""
    if task.is_regression:
        return ("pearson", "spearmanr")
    return ("accuracy",) + {"f1": ("f1",), "matthews": ("matthews_correlation",)}.get(task.metric, ())
