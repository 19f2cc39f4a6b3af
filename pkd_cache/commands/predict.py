"""`--do-predict`: a trained model's predictions on the task's test split(s), written as run_glue.py writes them:
`predict_results_<task>.txt` (MNLI's mismatched split: `predict_results_mnli-mm.txt`), a header `index<TAB>prediction`
and one line per example in file order, the label's name for classification, the score to 3 decimals for
regression."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..data.batches import ArrayBatches
from ..data.loading import load_test_examples, test_splits
from ..data.tasks import TaskSpec
from ..data.tokenize import to_model_inputs, tokenize
from ..progress import log
from ..training import predict
from .evaluate import counted


def write_predictions(model, tokenizer, task: TaskSpec, folder: Path, data_dir: Optional[str], max_seq_length: int,
                      batch_size: int, device, max_examples: Optional[int] = None) -> list[Path]:
    """Predict every test split of `task` with `model`; the files written into `folder`."""
    written = []
    for split in test_splits(task):
        ex = load_test_examples(task, split, data_dir, max_examples)
        arrays = tokenize(tokenizer, ex, 0, len(ex), max_seq_length)
        arrays["labels"] = ex.labels
        batches = ArrayBatches(arrays, batch_size)
        logits, _ = predict(model, counted(batches.epoch(), len(batches), f"predicting {split}"), device,
                            to_model_inputs)
        suffix = "-mm" if split.endswith("mismatched") else ""
        path = Path(folder) / f"predict_results_{task.name}{suffix}.txt"
        if task.is_regression:
            values = [f"{v:3.3f}" for v in logits.numpy().reshape(-1)]
        else:
            values = [task.label_names[i] for i in np.argmax(logits.numpy(), axis=1)]
        path.write_text("index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
        log(f"wrote {len(values):,} {split} predictions to {path}")
        written.append(path)
    return written
