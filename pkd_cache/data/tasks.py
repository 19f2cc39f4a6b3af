"""The GLUE tasks pkd-cache knows: text columns, label names, dev splits and the metric of each.

Split names follow the Hugging Face `glue` dataset ("train", "validation", and for MNLI
"validation_matched" / "validation_mismatched"); these are also the group names inside a store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import PkdCacheError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_a: tuple[str, ...]  # accepted column names for the first text, first match wins
    text_b: Optional[tuple[str, ...]]  # None for single-sentence tasks
    label: tuple[str, ...]
    label_names: tuple[str, ...]  # empty for regression (stsb)
    metric: str  # accuracy | f1 | matthews | pearson_spearman
    dev_splits: tuple[str, ...] = ("validation",)
    hub_config: str = ""  # config name of the hub `glue` dataset
    glue_dir: str = ""  # folder name in the original GLUE download
    local_dev_names: dict = field(default_factory=dict)  # split -> file stems in a local folder
    headerless_columns: Optional[tuple[str, ...]] = None  # original GLUE files without a header line

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train",) + self.dev_splits

    @property
    def main_metric(self) -> str:
        """The figure used to pick the best checkpoint."""
        return {"f1": "f1", "matthews": "matthews_correlation", "pearson_spearman": "pearson"}.get(
            self.metric, "accuracy"
        )


_ENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sst2", ("sentence",), None, ("label",), ("negative", "positive"), "accuracy",
                 hub_config="sst2", glue_dir="SST-2"),
        TaskSpec("cola", ("sentence",), None, ("label",), ("unacceptable", "acceptable"), "matthews",
                 hub_config="cola", glue_dir="CoLA",
                 headerless_columns=("source", "label", "original_label", "sentence")),
        TaskSpec("mrpc", ("sentence1", "#1 String"), ("sentence2", "#2 String"), ("label", "Quality"),
                 ("not_equivalent", "equivalent"), "f1", hub_config="mrpc", glue_dir="MRPC"),
        TaskSpec("qqp", ("question1",), ("question2",), ("label", "is_duplicate"),
                 ("not_duplicate", "duplicate"), "f1", hub_config="qqp", glue_dir="QQP"),
        TaskSpec("mnli", ("premise", "sentence1"), ("hypothesis", "sentence2"), ("label", "gold_label"),
                 ("entailment", "neutral", "contradiction"), "accuracy",
                 dev_splits=("validation_matched", "validation_mismatched"), hub_config="mnli", glue_dir="MNLI",
                 local_dev_names={"validation_matched": ("dev_matched", "validation_matched"),
                                  "validation_mismatched": ("dev_mismatched", "validation_mismatched")}),
        TaskSpec("qnli", ("question",), ("sentence",), ("label",), _ENT, "accuracy",
                 hub_config="qnli", glue_dir="QNLI"),
        TaskSpec("rte", ("sentence1",), ("sentence2",), ("label",), _ENT, "accuracy",
                 hub_config="rte", glue_dir="RTE"),
        TaskSpec("stsb", ("sentence1",), ("sentence2",), ("label", "score"), (), "pearson_spearman",
                 hub_config="stsb", glue_dir="STS-B"),
    ]
}

_ALIASES = {"sst-2": "sst2", "sst": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "qnli": "qnli"}


def get_task(name: str) -> TaskSpec:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise PkdCacheError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]
