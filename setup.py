"""The compiled pieces, both optional (the rest of the build is in pyproject.toml):

- store/_bits.c: the reader's one-pass finiteness check of every decoded float;
- teacher/_sampler.c: `dump --task lm --logits sample:N`'s draws, a row at a time.

Where they cannot be built (no C compiler), pip installs pkd-cache without them and the same code paths run in
numpy and torch instead: the same answers (the draws up to float rounding), at more CPU (benchmarks/RESULTS.md).
-ffp-contract=off: no fused multiply-adds, so every build of the sampler rounds the same way.
"""
import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(ext_modules=[
    Extension("pkd_cache.store._bits", ["pkd_cache/store/_bits.c"], optional=True, extra_compile_args=FLAGS),
    Extension("pkd_cache.teacher._sampler", ["pkd_cache/teacher/_sampler.c"], optional=True,
              extra_compile_args=FLAGS),
])
