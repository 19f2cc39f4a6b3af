"""pkd-cache: Patient Knowledge Distillation with a cached teacher.

    pkd_cache.finetune(FinetuneConfig(...))   # a teacher for the task
    pkd_cache.dump(DumpConfig(...))           # run it once, write logits + every layer's [CLS] to a store
    pkd_cache.distill(DistillConfig(...))     # train students from the store, no teacher in memory
    pkd_cache.open_store(path).batches("train", 32)
"""
__version__ = "0.1.0"

from .config import DistillConfig, DumpConfig, EvalConfig, FinetuneConfig, TrainConfig  # noqa: E402
from .errors import PkdCacheError  # noqa: E402


def finetune(config: FinetuneConfig) -> dict:
    from .teacher.finetune import finetune as _finetune

    return _finetune(config)


def dump(config: DumpConfig):
    from .dump import dump as _dump

    return _dump(config)


def distill(config: DistillConfig) -> dict:
    from .distill import distill as _distill

    return _distill(config)


def evaluate(config: EvalConfig) -> dict:
    from .evaluate import evaluate as _evaluate

    return _evaluate(config)


def open_store(path: str):
    from .store import open_store as _open_store

    return _open_store(path)


__all__ = ["DistillConfig", "DumpConfig", "EvalConfig", "FinetuneConfig", "TrainConfig", "PkdCacheError",
           "finetune", "dump", "distill", "evaluate", "open_store", "__version__"]
