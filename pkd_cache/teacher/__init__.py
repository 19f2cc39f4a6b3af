"""The teacher: load it (hub name, alias or folder), fine-tune it on a task, run it to get logits and CLS vectors."""
from .load import MODEL_ALIASES, LoadedModel, load_for_task, resolve_model_name

__all__ = ["MODEL_ALIASES", "LoadedModel", "load_for_task", "resolve_model_name"]
