"""pkd-cache: Patient Knowledge Distillation with a cached teacher.

    pkd_cache.finetune(FinetuneConfig(...))   # a teacher for the task
    pkd_cache.dump(DumpConfig(...))           # run it once, write logits + every layer's [CLS] to a store
    pkd_cache.distill(DistillConfig(...))     # train students from the store, no teacher in memory
    pkd_cache.open_store(path).batches("train", 32)

The functions and `Store` are imported on first use (PEP 562): `import pkd_cache` and the CLI's `--help` must not
pay for torch, transformers, zarr and datasets (seconds). The configs and the error type are light, so eager.
"""
import importlib
from typing import TYPE_CHECKING

from .config import DistillConfig, DumpConfig, EvalConfig, FinetuneConfig, TrainConfig
from .errors import PkdCacheError
from .version import __version__

if TYPE_CHECKING:  # type checkers and IDEs see the real names; at run time __getattr__ imports them
    from .commands.distill import distill, distill_many
    from .commands.dump import dump
    from .commands.evaluate import evaluate
    from .store.reader import Store, open_store
    from .commands.finetune import finetune

# name -> the module that defines it
_LAZY = {"Store": "store.reader", "open_store": "store.reader", "finetune": "commands.finetune",
         "dump": "commands.dump", "distill": "commands.distill", "distill_many": "commands.distill",
         "evaluate": "commands.evaluate"}

__all__ = ["DistillConfig", "DumpConfig", "EvalConfig", "FinetuneConfig", "TrainConfig", "PkdCacheError", "Store",
           "finetune", "dump", "distill", "distill_many", "evaluate", "open_store", "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once; later reads do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
