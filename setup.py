"""The compiled pieces, both optional (the rest of the build is in pyproject.toml):

- store/_bits.c: the reader's one-pass finiteness check of every decoded float;
- teacher/_sampler.c: `dump --task lm --logits sample:N`'s draws, a row at a time.

Where they cannot be built (no C compiler), pip installs pkd-cache without them and the same code paths run in
numpy and torch instead: the same answers (the draws up to float rounding), at more CPU (benchmarks/RESULTS.md).
-ffp-contract=off: no fused multiply-adds, so every build of the sampler rounds the same way.
The sampler is built with OpenMP where the compiler has it (-fopenmp): it then splits its rows over torch's own
OpenMP threads instead of a pool of its own, which would compete with them while they spin-wait after each op.
"""
import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]


class BuildExt(build_ext):
    """build_ext, with -fopenmp added to the sampler where a test program compiles and links with it."""

    def build_extension(self, ext):
        if ext.name.endswith("._sampler") and self._has_openmp():
            ext.extra_compile_args = ext.extra_compile_args + ["-fopenmp"]
            ext.extra_link_args = ext.extra_link_args + ["-fopenmp"]
        super().build_extension(ext)

    def _has_openmp(self) -> bool:
        if sys.platform == "win32":
            return False
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "omp.c")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                objects = self.compiler.compile([src], output_dir=d, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objects, "omp", output_dir=d, extra_postargs=["-fopenmp"])
            except Exception:  # no OpenMP here: the sampler's own thread pool splits the rows
                return False
        return True


setup(cmdclass={"build_ext": BuildExt}, ext_modules=[
    Extension("pkd_cache.store._bits", ["pkd_cache/store/_bits.c"], optional=True, extra_compile_args=FLAGS),
    Extension("pkd_cache.teacher._sampler", ["pkd_cache/teacher/_sampler.c"], optional=True,
              extra_compile_args=FLAGS),
])
