"""A CLI that answers at once: `--help`, a bad flag and the store commands that only read (info, verify, ls,
serve) never import torch, transformers, zarr or datasets (seconds of start-up). Each check runs in a fresh
interpreter, since this test process has long imported them all.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "zarr", "datasets")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
ENV.pop("PKD_CACHE_DEBUG", None)

# Runs each argv through the console script's main() in one interpreter and prints, per argv, its exit code and
# the heavy modules loaded so far, as one JSON line.
RUN_CLI = textwrap.dedent("""
    import json, sys
    from pkd_cache.cli import main
    heavy, out = {heavy!r}, []
    for argv in {argvs!r}:
        sys.argv = ["pkd-cache", *argv]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out.append({{"argv": argv, "code": code, "heavy": [m for m in heavy if m in sys.modules]}})
    print("RESULT " + json.dumps(out))
""")


def python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=timeout)


def run_cli(*argvs: list[str]) -> list[dict]:
    r = python(RUN_CLI.format(heavy=HEAVY, argvs=[list(map(str, a)) for a in argvs]))
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_light(results: list[dict], codes: dict[int, int]) -> None:
    for i, r in enumerate(results):
        assert r["code"] == codes.get(i, 0), r
        assert not r["heavy"], f"`pkd-cache {' '.join(r['argv'])}` imported {r['heavy']}"


@pytest.mark.subprocess
@pytest.mark.parametrize("module", ["pkd_cache", "pkd_cache.cli", "pkd_cache.commands.serve",
                                    "pkd_cache.store.listing"])
def test_import_is_light(module):
    r = python(f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import {module} brought in {r.stdout.strip()}"


@pytest.mark.subprocess
def test_help_and_bad_flags_import_no_torch():
    from pkd_cache.cli import app

    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"distill", "dump", "info", "verify", "ls", "serve", "sweep", "eval"} <= set(commands)
    helps = [["--help"]] + [[c, "--help"] for c in commands]
    bad = [["distill", "--epochs", "abc"],  # click rejects the value
           ["distill", "--store", "x", "--output-dir", "y", "--epochs", "0"],  # the config's check() rejects it
           ["dump", "--teacher", "t", "--task", "sst2", "--out", "o", "--dtype", "x"],
           ["finetune", "--model", "m", "--task", "sst2", "--output-dir", "o", "--max-steps", "0"],
           ["eval", "--model", "m", "--task", "sst2", "--batch-size", "0"],
           ["sweep", "--store", "x", "--output-dir", "y", "--epochs", "0"],
           ["bench-student", "--model", "m", "--batch-size", "0"],
           ["info", "--no-such-flag", "x"], ["no-such-command"]]
    results = run_cli(*helps, *bad)
    assert_light(results, {len(helps) + i: 2 for i in range(len(bad))})


@pytest.mark.subprocess
def test_store_commands_import_no_torch(store_path, tmp_path):
    results = run_cli(["info", store_path], ["info", "--json", store_path], ["verify", store_path],
                      ["ls", store_path.parent], ["info", tmp_path / "missing.zarr"])
    assert_light(results, {4: 2})
    # serve's listing reads the same metadata
    r = python(f"import sys; from pkd_cache.commands.serve_stores import _store_meta; assert _store_meta(__import__('pathlib')"
               f".Path({str(store_path)!r}))['format'] == 'pkd-cache'; "
               f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


@pytest.mark.subprocess
def test_lazy_api_is_the_functions():
    """`pkd_cache.dump` is the function, also once its command module (`pkd_cache.commands.dump`) is imported;
    every name of __all__ resolves and is listed by dir()."""
    code = textwrap.dedent("""
        import importlib, inspect, sys
        import pkd_cache
        assert not any(m in sys.modules for m in ("torch", "zarr")), "import pkd_cache is not lazy"
        listed = dir(pkd_cache)
        assert set(pkd_cache.__all__) <= set(listed), set(pkd_cache.__all__) - set(listed)
        assert pkd_cache.dump is pkd_cache.dump and inspect.isfunction(pkd_cache.dump)
        module = importlib.import_module("pkd_cache.commands.distill")  # first import of the command module
        assert inspect.ismodule(module) and inspect.isfunction(pkd_cache.distill), pkd_cache.distill
        assert pkd_cache.distill is module.distill
        import pkd_cache.commands.evaluate
        assert inspect.isfunction(pkd_cache.evaluate)
        from pkd_cache import Store, distill_many, finetune, open_store
        from pkd_cache.store import open_store as store_open
        assert open_store is store_open and inspect.isclass(Store) and callable(finetune) and callable(distill_many)
        for name in pkd_cache.__all__:
            getattr(pkd_cache, name)
        try:
            pkd_cache.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("pkd_cache.no_such_name")
        print("ok")
    """)
    r = python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_version_has_one_home():
    import importlib.metadata

    import pkd_cache
    from pkd_cache.version import __version__

    assert pkd_cache.__version__ == __version__ == importlib.metadata.version("pkd-cache")
