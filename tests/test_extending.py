"""Adding a store format or an array kind is one new file (docs/ARCHITECTURE.md): a module dropped next to the
others is found, written by dump, read, listed and verified, with no line changed anywhere else."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pkd_cache.testing import cli_env, cli_in_process, show

import pkd_cache
from pkd_cache.store.verify import verify_store

# a whole new format, in one file: Arrow shards whose metadata lives in `alt.json`
ALT_BACKEND = textwrap.dedent('''
    from pkd_cache.store.backends.arrow_backend import ArrowBackend, ArrowStoreWriter


    class AltWriter(ArrowStoreWriter):
        meta_key = "alt.json"


    class AltBackend(ArrowBackend):
        name, meta_key, sink, order = "alt", "alt.json", AltWriter, 50


    BACKEND = AltBackend
''')

# a whole new array, in one file: each example's token count, derived from its attention mask at dump time
LENGTHS_KIND = textwrap.dedent('''
    from pkd_cache.store.arrays.kind import ArrayKind


    def _check(v, meta):
        if v.min() < 1 or v.max() > meta.max_seq_length:
            return f"holds lengths outside [1, {meta.max_seq_length}]"
        return None


    KINDS = (ArrayKind("lengths", 7, lambda d: (d.n,), "int32", check=_check,
                       derive=lambda chunk: chunk["attention_mask"].sum(axis=1).astype("int32")),)
''')


def dump_config(teacher_dir, data_dir, out, **kw) -> pkd_cache.DumpConfig:
    return pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir), out=str(out),
                                max_seq_length=24, batch_size=16, chunk_size=64, **kw)


@pytest.fixture
def alt_backend(tmp_path, monkeypatch):
    """ALT_BACKEND as a module of store/backends/ (a second folder on the package's path, so the source tree is
    never written to)."""
    from pkd_cache.store import backends, registry

    folder = tmp_path / "more_backends"
    folder.mkdir()
    (folder / "alt_backend.py").write_text(ALT_BACKEND)
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(folder)])
    registry.all_backends.cache_clear()
    yield
    registry.all_backends.cache_clear()
    sys.modules.pop(f"{backends.__name__}.alt_backend", None)


def test_a_backend_is_one_new_file(alt_backend, teacher_dir, data_dir, store_path, tmp_path):
    out = tmp_path / "sst2.alt"
    pkd_cache.dump(dump_config(teacher_dir, data_dir, out, format="alt"))
    assert (out / "alt.json").is_file() and not (out / "pkd_cache.json").exists()
    alt, zarr = pkd_cache.open_store(str(out)), pkd_cache.open_store(str(store_path))
    assert alt.store_format == "alt"
    assert verify_store(str(out)).ok
    for split in ("train", "validation"):
        for name in pkd_cache.store.ARRAYS:
            np.testing.assert_array_equal(alt.array(split, name)[:], zarr.array(split, name)[:], err_msg=name)
    p = cli_in_process("ls", "--json", tmp_path)
    assert p.returncode == 0 and [s["name"] for s in json.loads(p.stdout)] == ["sst2.alt"], show(p)


# Run in a fresh interpreter: the kinds are found once, when store/arrays/ is first imported, so the extra folder
# goes on the package's path before that.
WITH_LENGTHS = textwrap.dedent('''
    import importlib.util, json, sys
    spec = importlib.util.find_spec("pkd_cache.store.arrays")
    spec.submodule_search_locations.append({folder!r})
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    import numpy as np
    import pkd_cache
    from pkd_cache.store.verify import verify_store
    from pkd_cache.testing.tamper import chunk_files, decode, rewrite_chunk

    out = {out!r}
    pkd_cache.dump(pkd_cache.DumpConfig(teacher={teacher!r}, task="sst2", data_dir={data!r}, out=out, max_seq_length=24,
                                        batch_size=16, chunk_size=64, format={fmt!r}))
    store = pkd_cache.open_store(out)
    lengths, mask = store.array("train", "lengths")[:], store.array("train", "attention_mask")[:]
    batch = next(iter(store.batches("train", 8, fields=("lengths", "attention_mask"), shuffle=False)))
    result = {{"equal": bool((lengths == mask.sum(axis=1)).all()), "n": len(lengths), "ok": verify_store(out).ok,
              "batch": batch["lengths"].tolist(), "batch_mask": batch["attention_mask"].sum(dim=1).tolist()}}
    if {fmt!r} == "zarr":  # a chunk of impossible lengths, with a matching checksum: refused by the kind's check
        from pathlib import Path
        first = sorted(chunk_files(Path(out), "train/lengths"))[0]
        values = decode(first, (64,), "int32")
        values[3] = 99
        rewrite_chunk(Path(out), "train/lengths/c/0", values)
        report = verify_store(out)
        result["tampered"] = [str(p) for p in report.problems]
    print("RESULT " + json.dumps(result))
''')


@pytest.mark.subprocess
@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_an_array_kind_is_one_new_file(fmt, teacher_dir, data_dir, tmp_path):
    folder = tmp_path / "more_kinds"
    folder.mkdir()
    (folder / "lengths.py").write_text(LENGTHS_KIND)
    out = tmp_path / f"sst2.{fmt}"
    code = WITH_LENGTHS.format(folder=str(folder), out=str(out), teacher=str(teacher_dir), data=str(data_dir),
                               fmt=fmt)
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["equal"] and result["ok"] and result["n"] > 64, result
    assert result["batch"] == result["batch_mask"], result  # the stream reads it, trimmed to no one's width
    if fmt == "zarr":
        assert any("lengths outside [1, 24]" in p for p in result["tampered"]), result
