"""The README.md model card `distill` writes beside a student: Hugging Face metadata (base model, dataset, metrics,
as the hub's model-index reads it), the distillation settings and the store the teacher outputs came from."""
from __future__ import annotations

import json
from pathlib import Path

from .evaluate import split_and_metric


def model_card(name: str, metrics: dict, task, store_meta) -> str:
    """`metrics`: what distill writes to metrics.json; `task`: its TaskSpec; `store_meta`: the store's StoreMeta, or
    None for online KD."""
    main = next(k for k in metrics if k.startswith("best_") and k not in ("best_epoch", "best_step"))
    split, metric = split_and_metric(main[len("best_"):], task)
    dataset = {"name": f"GLUE {task.name.upper()}", "type": "glue", "config": task.hub_config or task.name,
               "split": split}
    front = {
        "base_model": metrics.get("student_init"),
        "datasets": ["nyu-mll/glue"],
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["knowledge-distillation", "patient-knowledge-distillation", "pkd-cache"],
        "model-index": [{"name": name, "results": [{
            "task": {"type": "text-classification", "name": "Text Classification"}, "dataset": dataset,
            "metrics": [{"type": metric, "value": round(float(metrics[main]), 4), "name": f"{split} {metric}"}]}]}],
    }
    teacher = store_meta.teacher if store_meta is not None else None
    rows = [("student", f"{metrics['student_layers']} layers from `{metrics.get('student_init')}`"),
            ("teacher", f"`{metrics.get('online_teacher')}` (online)" if teacher is None else
             f"`{teacher.name_or_path}`, {teacher.num_layers} layers x {teacher.hidden_size}"),
            ("store", f"`{metrics.get('store')}`" if store_meta is None else
             f"`{metrics.get('store')}`, cache key `{store_meta.cache_key or '-'}`"),
            ("layer map (student 1..k-1 -> teacher)", ", ".join(map(str, metrics["layer_map"]))),
            ("alpha (KD weight)", metrics["alpha"]), ("beta (patient weight)", f"{metrics['beta']:g}"),
            ("temperature", metrics["temperature"]),
            ("batch", _batch(metrics.get("batch") or {})),
            ("learning rate, epochs", f"{metrics['config']['train']['learning_rate']:g}, "
                                      f"{metrics['config']['train']['epochs']:g}"),
            ("seed", metrics["config"]["train"]["seed"]),
            (f"best {split} {metric}", f"{metrics[main]:.4f} (epoch {metrics['best_epoch']}, step "
                                       f"{metrics.get('best_step')})")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"---\n{_yaml(front)}---\n\n# {name}\n\nA {metrics['student_layers']}-layer student distilled with "
            f"Patient Knowledge Distillation (Sun et al., EMNLP 2019) by pkd-cache from "
            f"cached teacher outputs: cross-entropy on the labels, KD on the teacher's logits and the patient loss on "
            f"the normalised [CLS] vectors of mapped layers.\n\n| setting | value |\n|---|---|\n{table}\n\n"
            f"Reproduce: `pkd-cache distill` with the settings in `metrics.json` (`config`), or evaluate with "
            f"`pkd-cache eval --model <this folder> --task {task.name}`.\n")


def write_model_card(folder: Path, name: str, metrics: dict, task, store_meta) -> None:
    (Path(folder) / "README.md").write_text(model_card(name, metrics, task, store_meta))


def _batch(b: dict) -> str:
    if not b:
        return "-"
    return f"{b['global']} ({b['per_device']} per device x {b['ranks']} rank(s) x {b['gradient_accumulation_steps']})"


def _yaml(value, indent: int = 0) -> str:
    """A small YAML writer for the card's front matter (dicts, lists, scalars; strings JSON-quoted, valid YAML)."""
    pad = "  " * indent
    out = ""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out += f"{pad}{k}:\n{_yaml(v, indent + 1)}"
            else:
                out += f"{pad}{k}: {_scalar(v)}\n"
        return out
    for item in value:
        if isinstance(item, dict):
            body = _yaml(item, indent + 1)
            out += f"{pad}- {body.lstrip()}"
        else:
            out += f"{pad}- {_scalar(item)}\n"
    return out


def _scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))
