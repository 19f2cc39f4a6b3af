"""Loading a sequence-classification encoder for a task, from a hub name, an alias or a local folder."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .data.tasks import TaskSpec
from .errors import PkdCacheError, first_line

MODEL_ALIASES = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
}
FINETUNE_INFO = "pkd_cache_finetune.json"  # written beside a teacher that `pkd-cache finetune` made


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel (…ForSequenceClassification)
    tokenizer: object
    name: str  # what the user asked for, alias resolved
    head_is_new: bool  # the classifier was initialised on load: the model is not trained for the task
    base_model: Optional[str]  # the pretrained model it was fine-tuned from, when known


def resolve_model_name(name: str) -> str:
    return MODEL_ALIASES.get(name, name)


def quiet_transformers() -> None:
    """We report loading problems ourselves; transformers' own load reports are noise for users."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a slash, or a leading . / ~, is a folder."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def load_config(name: str, **overrides):
    """The model config of a folder or hub name (`overrides` set on it, as AutoConfig takes them); one line when
    there is none."""
    from transformers import AutoConfig

    quiet_transformers()
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.exists():
        raise PkdCacheError(f"model path {name} does not exist")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name, **overrides)
    except Exception as e:
        where = "folder" if path.exists() else "Hugging Face hub (offline? pass a local folder)"
        raise PkdCacheError(f"could not load a model config from {name} ({where}): {first_line(e)}") from e


def load_for_task(name: str, task: TaskSpec, num_hidden_layers: Optional[int] = None,
                  what: str = "teacher") -> LoadedModel:
    """A …ForSequenceClassification model with the task's label count, plus its tokenizer.

    A checkpoint that already has a trained classification head with another label count is refused; a
    checkpoint without one gets a new head and `head_is_new=True`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    name = resolve_model_name(name)
    config = load_config(name)
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if trained_head and config.num_labels != task.num_labels and num_hidden_layers is None:
        raise PkdCacheError(f"{what} {name} has a {config.num_labels}-label head but task {task.name} has "
                            f"{task.num_labels} labels")
    kwargs = {"num_labels": task.num_labels}
    if not task.is_regression:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    if num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = num_hidden_layers
        kwargs["ignore_mismatched_sizes"] = True  # a student may start from a checkpoint with another head
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(name, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise PkdCacheError(f"{name} is not a sequence-classification encoder transformers can load: "
                            f"{first_line(e)}") from e
    if getattr(model.config, "is_encoder_decoder", False):
        raise PkdCacheError(f"{name} is an encoder-decoder model; pkd-cache distils encoders (BERT-style)")
    prefix = model.base_model_prefix + "."
    head_is_new = any(not k.startswith(prefix) for k in list(info["missing_keys"]) + list(info["mismatched_keys"]))
    return LoadedModel(model, tokenizer, name, head_is_new, _base_model(name, config, head_is_new))


def check_max_length(loaded: LoadedModel, max_seq_length: int) -> None:
    """A max length beyond the model's position embeddings would crash mid-run: refuse it up front."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise PkdCacheError(f"--max-seq-length {max_seq_length} is beyond the {limit} position embeddings of "
                            f"{loaded.name}")


def _base_model(name: str, config, head_is_new: bool) -> Optional[str]:
    info = Path(name).expanduser() / FINETUNE_INFO
    if info.is_file():
        return json.loads(info.read_text()).get("base_model")
    if head_is_new:
        return name  # a pretrained backbone: it is its own base
    return None
