"""The one compiled piece: store/_bits.c, the reader's one-pass finiteness check (the rest is in pyproject.toml).

Optional: where it cannot be built (no C compiler), pip installs pkd-cache without it and store/trust.py uses the
numpy passes instead, which give the same answers about twice as slowly (benchmarks/RESULTS.md, B3)."""
import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension("pkd_cache.store._bits", ["pkd_cache/store/_bits.c"], optional=True,
                             extra_compile_args=[] if sys.platform == "win32" else ["-O3"])])
