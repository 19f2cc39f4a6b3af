"""The team cache (store/cache.py): a dump without --out goes to its place in the cache, found again by content
before any model is loaded; an id names a store wherever --store is taken; two dumps of one key run the teacher
once."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pkd_cache.testing import cli_env, cli_in_process, show, tree_digest

import pkd_cache
from pkd_cache.store.cache import entries, used_key

ARGS = ["--task", "sst2", "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64"]
HEAVY = ("torch", "transformers")


def dump_args(teacher, data, cache, *extra) -> list:
    return ["dump", "--teacher", teacher, "--data-dir", data, "--cache", cache, *ARGS, *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_dir, data_dir):
    """A folder cache holding one store, dumped into it by `dump` without --out."""
    root = tmp_path_factory.mktemp("cache")
    p = cli_in_process(*dump_args(teacher_dir, data_dir, root))
    assert p.returncode == 0, show(p)
    return root


def only_entry(cache) -> tuple[str, str]:
    (name, ident), = entries(str(cache))
    return name, ident


def test_a_dump_without_out_goes_to_its_place_in_the_cache(cache, teacher_dir):
    name, ident = only_entry(cache)
    store = pkd_cache.open_store(str(cache / name))
    assert re.fullmatch(rf"sst2/{teacher_dir.name}-{ident}\.zarr", name), name
    assert store.info()["cache_key"].startswith(ident) and len(ident) == 12
    assert store.info()["created_by"].count("@") == 1
    assert store.info()["teacher"]["identity"].keys() == {"files"}  # by content, not by a local path


def test_a_hit_loads_no_model_and_rewrites_nothing(cache, teacher_dir, data_dir):
    """The same dump again, from a copy of the teacher in another folder: found by content, in a fresh interpreter
    that never imports torch or transformers (so no model was built)."""
    name, ident = only_entry(cache)
    before = tree_digest(cache / name)
    copy = cache.parent / "elsewhere" / "teacher"
    shutil.copytree(teacher_dir, copy)
    code = (f"import sys\nfrom pkd_cache.cli import main\nsys.argv = ['pkd-cache', *{list(map(str, dump_args(copy, data_dir, cache)))!r}]\n"
            f"try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"cache hit: {cache}/{name} (id {ident})" in " ".join(r.stderr.split()), r.stderr
    assert "HEAVY []" in r.stdout, (r.stdout, r.stderr)
    assert tree_digest(cache / name) == before  # the store is not touched; its last use is noted beside it (gc)
    assert json.loads((cache / used_key(name)).read_text())["by"].count("@") == 1


def test_an_id_names_the_store_wherever_a_store_is_taken(cache, monkeypatch):
    name, ident = only_entry(cache)
    p = cli_in_process("info", "--json", ident[:6], "--cache", cache)
    assert p.returncode == 0 and json.loads(p.stdout)["cache_key"].startswith(ident), show(p)
    monkeypatch.setenv("PKD_CACHE", str(cache))  # the environment does what --cache does
    p = cli_in_process("verify", ident)
    assert p.returncode == 0 and p.stdout.startswith(f"ok: {cache}/{name}"), show(p)
    assert pkd_cache.open_store(ident).path == f"{cache}/{name}"  # the Python API too


def teacher_name(row: dict) -> str:
    return row["teacher"].rstrip("/").rsplit("/", 1)[-1]


def test_ls_lists_the_cache_with_ids_and_who_made_them(cache, monkeypatch):
    name, ident = only_entry(cache)
    monkeypatch.setenv("PKD_CACHE", str(cache))
    p = cli_in_process("ls", "--json")
    assert p.returncode == 0, show(p)
    (row,) = json.loads(p.stdout)
    assert row["name"] == name and row["id"] == ident and "@" in row["created_by"], row
    monkeypatch.setenv("COLUMNS", "160")  # a terminal, not the runner's 80 columns
    p = cli_in_process("ls")
    assert p.returncode == 0 and ident in p.stdout and row["created_by"] in p.stdout, show(p)
    assert f"{teacher_name(row)} (4x32)" in p.stdout, show(p)
    monkeypatch.setenv("COLUMNS", "80")  # narrow: two lines a store, nothing cut or wrapped
    p = cli_in_process("ls")
    assert p.returncode == 0 and max(map(len, p.stdout.splitlines())) <= 80, show(p)
    lines = p.stdout.splitlines()
    assert lines[1].startswith(f"{name}  id {ident}") and lines[1].endswith(f"by {row['created_by']}"), show(p)
    assert lines[2].startswith(f"  sst2 | {teacher_name(row)} (4x32) | float16 | ") and \
        lines[2].endswith("| train 160, validation 48"), show(p)


@pytest.mark.parametrize("what, args, says", [
    ("no place", lambda c, t, d: ["dump", "--teacher", t, "--data-dir", d, *ARGS],
     "dump needs --out, or a cache to put the store in (--cache URL or PKD_CACHE)"),
    ("unknown id", lambda c, t, d: ["info", "abcdef", "--cache", c], "no store in cache {c} has id abcdef"),
    ("missing cache", lambda c, t, d: ["info", "abcdef", "--cache", c / "nowhere"],
     "cache {c}/nowhere does not exist (PKD_CACHE or --cache names it)"),
    ("unreachable cache", lambda c, t, d: ["dump", "--teacher", t, "--data-dir", d, *ARGS, "--cache",
                                           "http://127.0.0.1:9/cache"],
     "cannot reach http://127.0.0.1:9/cache/sst2 (ClientConnectorError; --debug shows the details)"),
])
def test_bad_cache_input_is_one_line(cache, teacher_dir, data_dir, monkeypatch, what, args, says):
    monkeypatch.delenv("PKD_CACHE", raising=False)
    p = cli_in_process(*args(cache, teacher_dir, data_dir))
    assert p.returncode == 2 and p.stderr.strip() == f"error: {says.format(c=cache)}", show(p)


def test_an_ambiguous_id_prefix_is_refused(cache, tmp_path):
    name, ident = only_entry(cache)
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    twin = other / name.replace(ident, ident[:4] + "0" * 8)
    shutil.copytree(other / name, twin)
    p = cli_in_process("info", ident[:4], "--cache", other)
    assert p.returncode == 2 and f"id {ident[:4]} matches 2 stores in cache {other}" in p.stderr, show(p)
    p = cli_in_process("info", "--json", ident[:5], "--cache", other)  # one more digit tells them apart
    assert p.returncode == 0 and json.loads(p.stdout)["cache_key"].startswith(ident), show(p)


@pytest.mark.subprocess
def test_two_dumps_of_one_key_run_the_teacher_once(teacher_dir, data_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cmd = [sys.executable, "-m", "pkd_cache", *map(str, dump_args(teacher_dir, data_dir, cache))]
    procs = [subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    logs = [" ".join((out + err).split()) for out, err in outs]
    assert sum("wrote " in log for log in logs) == 1, logs  # one ran the teacher ...
    assert sum("cache hit:" in log for log in logs) == 1, logs  # ... the other waited for it, then hit
    (name, _), = entries(str(cache))
    assert pkd_cache.open_store(str(cache / name)).complete


def test_no_wait_names_the_dump_holding_the_entry(cache, teacher_dir, data_dir, tmp_path):
    """A claim held by a live process (a record of pid 1 on this host: alive, and not this process) is refused at
    once with --no-wait, and nothing is written."""
    import socket

    from pkd_cache.store.cache import claim_url, entry_url

    other = tmp_path / "cache"
    other.mkdir()
    name, _ = only_entry(cache)
    key = pkd_cache.open_store(str(cache / name)).info()["cache_key"]
    claim = claim_url(entry_url(str(other), "sst2", str(teacher_dir), key, "zarr"))
    lock = Path(claim) / ".pkd_cache" / "lock.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "2026-12-02T10:00:00+00:00"}))
    p = cli_in_process(*dump_args(teacher_dir, data_dir, other, "--no-wait"))
    assert p.returncode == 2, show(p)
    assert "is being written by another dump (pid 1 on" in p.stderr and "without --no-wait" in p.stderr, show(p)
    assert entries(str(other)) == []


@pytest.mark.subprocess
def test_a_hub_teacher_is_keyed_by_its_name_and_commit(teacher_dir, data_dir, tmp_path):
    """The real hub code path, offline: a Hugging Face cache laid out as the hub client leaves it (refs/main ->
    snapshots/<commit>/), which both the key (identity.hub_revision) and the model load read."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-bert"
    shutil.copytree(teacher_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**cli_env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pkd_cache", *map(str, dump_args("someorg/tiny-bert", data_dir, tmp_path / "c"))]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "wrote " in first.stderr, first.stderr[-3000:]
    (name, ident), = entries(str(tmp_path / "c"))
    assert name.startswith("sst2/tiny-bert-"), name
    meta = pkd_cache.open_store(str(tmp_path / "c" / name)).info()
    assert meta["teacher"]["identity"] == {"hub": "someorg/tiny-bert", "revision": commit}
    assert meta["cache_key_parts"]["tokenizer"] == {"hub": "someorg/tiny-bert", "revision": commit}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"(id {ident})" in again.stderr, again.stderr[-3000:]
    (repo / "refs" / "main").write_text("f" * 40)  # the name now resolves to another commit: another store
    shutil.copytree(teacher_dir, repo / "snapshots" / ("f" * 40))
    moved = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert moved.returncode == 0 and "wrote " in moved.stderr, moved.stderr[-3000:]
    assert len(entries(str(tmp_path / "c"))) == 2


def test_gc_removes_by_last_use_and_keeps_what_is_written_or_recent(cache, tmp_path):
    """Four entries: used 100 days ago, 40 days ago, an hour ago, and one being written (a live claim)."""
    import datetime as dt
    import socket

    from pkd_cache.store.cache import claim_url

    name, ident = only_entry(cache)
    root = tmp_path / "cache"
    now = dt.datetime.now(dt.timezone.utc)
    ages = {"a" * 12: 100, "b" * 12: 40, "c" * 12: 0.04, "d" * 12: 100}
    for i, days in ages.items():
        entry = f"sst2/old-{i}.zarr"
        shutil.copytree(cache / name, root / entry)
        at = (now - dt.timedelta(days=days)).isoformat(timespec="seconds")
        (root / used_key(entry)).write_text(json.dumps({"at": at, "by": "someone@somewhere"}))
    claim = Path(claim_url(str(root / f"sst2/old-{'d' * 12}.zarr"))) / ".pkd_cache" / "lock.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": now.isoformat()}))
    size = sum(f.stat().st_size for f in (cache / name).rglob("*") if f.is_file())

    def left():
        return sorted(i for _, i in entries(str(root)))

    p = cli_in_process("gc", "--older-than", "30d", "--dry-run", "--cache", root)
    assert p.returncode == 0 and "would remove sst2/old-aaaa" in p.stdout and "would remove sst2/old-bbbb" in p.stdout
    assert "keeping sst2/old-dddd" in p.stdout and "being written (pid 1" in p.stdout, show(p)
    assert left() == sorted(ages)  # a dry run removes nothing
    p = cli_in_process("gc", "--older-than", "60d", "--cache", root)
    assert p.returncode == 0 and left() == ["b" * 12, "c" * 12, "d" * 12], show(p)
    assert not (root / used_key(f"sst2/old-{'a' * 12}.zarr")).exists()
    p = cli_in_process("gc", "--max-size", str(size), "--cache", root)  # room for one: the least recently used goes
    assert p.returncode == 0 and left() == ["c" * 12, "d" * 12], show(p)
    assert "the rest is in use" in p.stdout, show(p)  # c (recent) and d (written) stay, over the size
    p = cli_in_process("gc", "--max-size", "0", "--grace", "1m", "--cache", root)  # a shorter grace: c may go now
    assert p.returncode == 0 and left() == ["d" * 12], show(p)
    stranger = root / "sst2" / f"notes-{'e' * 12}.zarr"  # entry-shaped, but not a store pkd-cache wrote
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("x")
    p = cli_in_process("gc", "--max-size", "0", "--grace", "1m", "--cache", root)
    assert p.returncode == 0 and (stranger / "thesis.tex").exists(), show(p)


@pytest.mark.parametrize("args, says", [
    (["gc", "--older-than", "90d"], "gc needs a cache (--cache URL or PKD_CACHE)"),
    (["gc", "--cache", "{c}"], "gc needs --older-than or --max-size (or both); --dry-run shows what they would remove"),
    (["gc", "--cache", "{c}", "--older-than", "ninety days"],
     "--older-than takes a duration like 90d, 12h or 30m; got 'ninety days'"),
    (["gc", "--cache", "{c}", "--max-size", "2 tera"], "--max-size takes a size like 2TB, 500GB or 1.5GiB; got '2 tera'"),
])
def test_bad_gc_input_is_one_line(cache, args, says):
    p = cli_in_process(*[a.format(c=cache) for a in args])
    assert p.returncode == 2 and p.stderr.strip() == f"error: {says.format(c=cache)}", show(p)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_grown_dataset_reuses_the_cached_rows_and_equals_a_fresh_dump(teacher_dir, data_dir, tmp_path, dtype,
                                                                          monkeypatch):
    """The data grew by 12 examples (inserted among the old ones), and 5 old ones were re-spaced (other text, the
    same tokens): the teacher runs on those 12 only, only the 17 are tokenised (the others are found by their text
    hash), and the store equals a fresh dump of the whole up to float noise (reused rows were computed in other
    batches, whose padding changes the forward's float order): |a - b| <= 1e-5 + 1e-4 |b| for logits,
    2e-3 + 1e-2 |b| for CLS."""
    import random

    import numpy as np
    from pkd_cache.commands import dump_run
    from pkd_cache.testing import synthetic_rows

    cache = tmp_path / "cache"
    cache.mkdir()
    args = ["--dtype", dtype]
    p = cli_in_process(*dump_args(teacher_dir, data_dir, cache, *args))
    assert p.returncode == 0, show(p)
    grown = tmp_path / "grown" / "SST-2"
    grown.mkdir(parents=True)
    rows = (data_dir / "train.tsv").read_text().splitlines()
    new = [f"{s} again\t{y}" for s, y in synthetic_rows(12, 99)]
    respaced = [row.replace(" ", "  ", 1) if i < 5 else row for i, row in enumerate(rows[1:])]
    assert sum(a != b for a, b in zip(respaced, rows[1:])) == 5
    body = respaced + new
    random.Random(0).shuffle(body)
    (grown / "train.tsv").write_text("\n".join([rows[0]] + body) + "\n")
    shutil.copy(data_dir / "dev.tsv", grown / "dev.tsv")

    tokenised = []

    def counting(tokenizer, examples, start, stop, max_length):
        tokenised.append(stop - start)
        return tokenize(tokenizer, examples, start, stop, max_length)

    tokenize = dump_run.tokenize
    monkeypatch.setattr(dump_run, "tokenize", counting)
    p = cli_in_process(*dump_args(teacher_dir, grown, cache, *args))
    assert p.returncode == 0, show(p)
    said = " ".join(p.stderr.split())
    assert "reused 208 of 220 examples from" in said and "teacher ran on 12" in said, show(p)
    assert sum(tokenised) == 12 + 5 + 2 * 2, tokenised  # new, re-spaced, and the probe's 2 rows of each split
    incremental = next(pkd_cache.open_store(str(cache / n)) for n, _ in entries(str(cache))
                       if pkd_cache.open_store(str(cache / n)).meta.splits["train"].num_examples == 172)
    fresh = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(grown),
                                                out=str(tmp_path / "fresh.zarr"), max_seq_length=24, batch_size=16,
                                                chunk_size=64, dtype=dtype))
    assert incremental.info()["cache_key"] == fresh.info()["cache_key"]
    for split in ("train", "validation"):
        for name in ("input_ids", "attention_mask", "token_type_ids", "labels", "example_hash"):
            np.testing.assert_array_equal(incremental.array(split, name)[:], fresh.array(split, name)[:])
        a, b = incremental.read(split, 0, fresh.num_examples(split)), fresh.read(split, 0, fresh.num_examples(split))
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a["cls"].astype(np.float32), b["cls"].astype(np.float32), rtol=1e-2, atol=2e-3)


def test_a_store_from_before_text_hashes_grows_and_gives_rows_by_token_hash(teacher_dir, data_dir, tmp_path,
                                                                           monkeypatch):
    """A store written before text hashes (its `extra_arrays` lists only example_hash) keeps its own layout when a
    split is added to it, and as a donor its rows are found by their token digests."""
    from pkd_cache.commands import dump_run

    cache = tmp_path / "cache"
    cache.mkdir()
    with monkeypatch.context() as m:
        m.setattr(dump_run, "EXTRA_ARRAYS", ("example_hash",))  # what pkd-cache wrote before text hashes
        p = cli_in_process(*dump_args(teacher_dir, data_dir, cache, "--split", "train"))
        assert p.returncode == 0, show(p)
    (name, _), = entries(str(cache))
    p = cli_in_process(*dump_args(teacher_dir, data_dir, cache, "--out", cache / name, "--add-split", "validation"))
    assert p.returncode == 0, show(p)
    old = pkd_cache.open_store(str(cache / name))
    assert old.info()["extra_arrays"] == ["example_hash"] and old.splits == ["train", "validation"]
    p = cli_in_process("verify", cache / name)
    assert p.returncode == 0, show(p)

    p = cli_in_process(*dump_args(teacher_dir, data_dir, cache, "--max-examples", "100"))  # other data: a miss
    assert p.returncode == 0, show(p)
    said = " ".join(p.stderr.split())
    assert "reused 148 of 148 examples from" in said and "teacher ran on 0" in said, show(p)
    new = next(pkd_cache.open_store(str(cache / n)) for n, _ in entries(str(cache)) if n != name)
    assert new.info()["extra_arrays"] == ["example_hash", "text_hash"]
    for split in ("train", "validation"):
        np.testing.assert_array_equal(new.array(split, "input_ids")[:], old.array(split, "input_ids")[:100])


def test_a_miss_in_a_cache_it_cannot_write_is_one_line(cache, teacher_dir, data_dir, tmp_path, monkeypatch):
    """(Simulated: the suite runs as root, which no folder permission stops.) A hit needs no write access."""
    from pkd_cache.store import journal

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(journal.WriterLock, "acquire", denied)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, cache))  # a hit: served without any write
    assert p.returncode == 0 and "cache hit:" in p.stderr, show(p)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, cache, "--max-examples", "100"))  # a miss
    assert p.returncode == 2 and p.stderr.strip() == (
        f"error: cannot write to cache {cache} (Permission denied): a dump that misses puts its store there; ask "
        f"for write access, or pass --out"), show(p)


def test_a_damaged_cache_entry_is_never_a_hit(cache, teacher_dir, data_dir, tmp_path):
    name, _ = only_entry(cache)
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    chunk = sorted((other / name / "train" / "logits" / "c").rglob("*"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:-3])  # truncated
    before = tree_digest(other / name)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, other))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, show(p)
    assert "holds this dump but fails its checks" in p.stderr and "--overwrite" in p.stderr, show(p)
    assert tree_digest(other / name) == before  # nothing lost: it stays for someone to look at
    p = cli_in_process(*dump_args(teacher_dir, data_dir, other, "--overwrite"))
    assert p.returncode == 0 and "wrote " in p.stderr, show(p)
    assert pkd_cache.open_store(str(other / name)).complete


def test_serve_of_a_cache_serves_its_task_folders(cache):
    """`pkd-cache serve <cache>`: the entries one folder down are listed, readable and have their pages."""
    import threading
    import urllib.request

    from pkd_cache.commands.serve import make_server
    from pkd_cache.store.listing import list_stores

    name, ident = only_entry(cache)
    server = make_server(str(cache), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert [(s["name"], s["id"]) for s in list_stores(server.url)] == [(name, ident)]
        remote = pkd_cache.open_store(f"{server.url}/{name}")
        local = pkd_cache.open_store(str(cache / name))
        assert remote.read("validation", 0, 8)["labels"].tolist() == local.read("validation", 0, 8)["labels"].tolist()
        with urllib.request.urlopen(f"{server.url}/-/{name}?format=json", timeout=30) as r:
            page = json.loads(r.read())
        assert page["name"] == name and "accuracy" in page["teacher_dev_metric"]["validation"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_bucket_cache_shares_its_fine_tuned_teachers(backbone_dir, data_dir, tmp_path, monkeypatch):
    """A head-less teacher fine-tuned by a dump into a bucket cache is uploaded there; a teammate's dump (another
    machine: another user cache, another format) copies it instead of fine-tuning again."""
    import os

    from pkd_cache.commands import finetune
    from pkd_cache.models import FINETUNE_INFO
    from pkd_cache.store.location import Location

    cache = "memory://pkd-teachers/cache"
    cfg = pkd_cache.DumpConfig(teacher=str(backbone_dir), task="sst2", data_dir=str(data_dir), cache=cache,
                               max_seq_length=24, chunk_size=64,
                               finetune_train=pkd_cache.TrainConfig(epochs=1, learning_rate=1e-3, logging_steps=0))
    first = pkd_cache.dump(cfg).info()["teacher"]
    shared = Location(f"{cache}/teachers/sst2/{backbone_dir.name}-{first['finetuned_id']}")
    assert shared.exists(FINETUNE_INFO) and shared.exists("model.safetensors")

    monkeypatch.setenv("PKD_CACHE_HOME", str(tmp_path / "teammate"))  # another machine's user cache

    def no_finetune(*a, **k):
        raise AssertionError("fine-tuned again")

    monkeypatch.setattr(finetune, "finetune", no_finetune)
    cfg.format = "arrow"
    again = pkd_cache.dump(cfg).info()["teacher"]
    assert again["weights_fingerprint"] == first["weights_fingerprint"]
    assert Path(again["finetuned_by_dump"]).parent == tmp_path / "teammate" / "teachers" / "sst2"
    assert not [n for n in os.listdir(tmp_path / "teammate" / "teachers" / "sst2") if n.startswith(".")]
