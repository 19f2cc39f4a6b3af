"""An API user owns the log: pkd_cache logs through `logging` ("pkd_cache"), which they can silence or redirect.

Each case runs in a fresh interpreter: logging's configuration is process-wide, and this one's is pytest's.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.subprocess

SETUP = {
    "nothing configured": "",
    "silenced": "logger.setLevel(logging.WARNING)",
    "redirected": "logger.addHandler(logging.StreamHandler(sys.stdout)); logger.setLevel(logging.INFO)",
    "root configured": "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='root: %(message)s')",
    "quiet": "import contextlib; stack = contextlib.ExitStack(); stack.enter_context(progress.quiet())",
}
# what the line `log("dumped 3 chunks")` shows: (stdout, stderr)
EXPECT = {
    "nothing configured": ("", "dumped 3 chunks\n"),
    "silenced": ("", ""),
    "redirected": ("dumped 3 chunks\n", ""),
    "root configured": ("root: dumped 3 chunks\n", ""),  # once: the default handler stays out of the way
    "quiet": ("", ""),
}


@pytest.mark.parametrize("case", list(SETUP))
def test_an_api_user_silences_or_redirects_the_log(case):
    code = textwrap.dedent(f"""
        import logging, sys
        from pkd_cache import progress
        logger = logging.getLogger("pkd_cache")
        {SETUP[case]}
        progress.log("dumped 3 chunks")
        assert not progress.console.quiet  # no global console was touched
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == EXPECT[case]


def test_quiet_ends_with_its_block(capfd):
    from pkd_cache import progress

    progress.log_to_stderr()
    with progress.quiet():
        progress.log("inside")
        with progress.quiet(False):  # an inner block cannot undo an outer quiet
            progress.log("inner")
    progress.log("after")
    assert capfd.readouterr().err == "after\n"
