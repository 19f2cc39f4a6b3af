"""Tasks, loading raw examples (hub or local files), tokenising, metrics."""
from .tasks import TASKS, TaskSpec, get_task
from .loading import Examples, load_examples

__all__ = ["TASKS", "TaskSpec", "get_task", "Examples", "load_examples"]
