"""pkd-cache: Patient Knowledge Distillation with a cached teacher.

    pkd_cache.finetune(FinetuneConfig(...))   # a teacher for the task
    pkd_cache.dump(DumpConfig(...))           # run it once, write logits + every layer's [CLS] to a store
    pkd_cache.distill(DistillConfig(...))     # train students from the store, no teacher in memory
    pkd_cache.open_store(path).batches("train", 32)
"""
__version__ = "0.1.0"

# The functions are bound after their modules are imported, so `pkd_cache.dump` is the function (not the module).
from .config import DistillConfig, DumpConfig, EvalConfig, FinetuneConfig, TrainConfig  # noqa: E402
from .errors import PkdCacheError  # noqa: E402
from .store import Store, open_store  # noqa: E402
from .teacher.finetune import finetune  # noqa: E402
from .dump import dump  # noqa: E402
from .distill import distill, distill_many  # noqa: E402
from .evaluate import evaluate  # noqa: E402

__all__ = ["DistillConfig", "DumpConfig", "EvalConfig", "FinetuneConfig", "TrainConfig", "PkdCacheError", "Store",
           "finetune", "dump", "distill", "distill_many", "evaluate", "open_store", "__version__"]
