"""Crafted and damaged stores: every read is either refused with one line or gives exactly the untampered data.

The listed cases of issue 14 (a codec chain that skipped the checksums, a removed manifest, a half-written store
marked complete, metadata that disagrees with its arrays, crafted sizes, non-finite values and out-of-range labels
and ids with their checksums recomputed), then a property test that tampers a store in random allowed ways.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pkd_cache.testing.tamper import chunk_files, decode, edit_array, edit_attributes, read_json, record_file, rewrite_chunk, write_json

import pkd_cache
from pkd_cache.store.verify import verify_store

ENV_KEYS = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def copy(store_path, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(store_path, out)
    return out


def everything(path: Path, **kw) -> dict[str, list[dict]]:
    """Every batch a student or its evaluation would read: shuffled train with every CLS layer, ordered dev."""
    store = pkd_cache.open_store(str(path), **kw)
    return {"train": list(store.batches("train", 16, seed=3, shuffle_chunks=2)),
            "validation": list(store.batches("validation", 16, shuffle=False))}


def same(a: dict, b: dict) -> bool:
    return all(len(a[s]) == len(b[s]) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                               for x, y in zip(a[s], b[s])) for s in a)


def refused(path: Path, says: str = "", **kw) -> str:
    with pytest.raises(pkd_cache.PkdCacheError) as e:
        everything(path, **kw)
    message = str(e.value)
    assert "\n" not in message and says in message, message
    return message


def verify_problems(path: Path, **kw) -> list[str]:
    report = verify_store(str(path), **kw)
    assert not report.ok
    return report.problems


# --- 2. the checksums cannot be switched off from inside the store ---------------------------------------------------

def test_a_codec_chain_cannot_bypass_the_checksums(copy):
    """An identity-looking codec (transpose) in the chain once sent reads through zarr, unchecked; then a chunk
    swapped for another's and one deleted went unseen. Only pkd-cache's own layout is read now."""
    edit_array(copy, "train/input_ids", lambda d: d["codecs"].insert(0, {"name": "transpose",
                                                                         "configuration": {"order": [0, 1]}}))
    a, b = chunk_files(copy, "train/input_ids")[:2]
    a.write_bytes(b.read_bytes())
    chunk_files(copy, "train/cls")[0].unlink()
    refused(copy, "train/input_ids: array uses codecs ['transpose', 'bytes', 'blosc']")
    assert any("uses codecs" in p for p in verify_problems(copy))


def test_a_removed_manifest_is_refused_unless_allowed_and_missing_chunks_are_errors_even_then(store_path, copy):
    edit_attributes(copy, lambda m: m.pop("checksums"))
    (copy / "checksums.json").unlink()
    refused(copy, "has no checksum manifest (checksums.json)")
    assert verify_problems(copy)[0].startswith("checksums: the store has no checksum manifest")
    # a store of 0.1.0 (no manifest ever) behind the explicit flag: read and checked for values, with a note
    assert same(everything(copy, allow_no_checksums=True), everything(store_path))
    report = verify_store(str(copy), allow_no_checksums=True)
    assert report.ok and not report.checksummed and "goes unseen" in report.notes[0]
    chunk_files(copy, "train/logits")[1].unlink()
    refused(copy, "1 chunk(s) of the layout are missing, e.g. train/logits/c/1/0", allow_no_checksums=True)
    assert verify_problems(copy, allow_no_checksums=True) == ["train/logits chunk c/1/0 is missing"]


def test_a_half_written_store_marked_complete_is_refused(store_path, copy):
    """What a SIGKILL leaves (chunks missing, no manifest), hand-marked complete with the splits copied in."""
    for f in chunk_files(copy, "train/cls")[4:]:
        f.unlink()
    edit_attributes(copy, lambda m: (m.pop("checksums"), m.update(complete=True)))
    (copy / "checksums.json").unlink()
    refused(copy, "has no checksum manifest")
    refused(copy, "chunk(s) of the layout are missing, e.g. train/cls/c/", allow_no_checksums=True)


def test_a_chunk_the_manifest_lists_but_that_is_absent_is_found_when_the_store_opens(copy):
    chunk_files(copy, "validation/labels")[0].unlink()
    refused(copy, "1 chunk(s) the manifest records are missing, e.g. validation/labels/c/0")
    assert "validation/labels chunk c/0 is missing" in verify_problems(copy)


# --- 4. the metadata is checked against the arrays before anything is allocated ------------------------------------

@pytest.mark.parametrize("edit, says", [
    (lambda c: edit_array(c, "train/logits", lambda d: d.update(data_type="float64")),
     "train/logits: array has data type 'float64', the metadata says float32"),
    (lambda c: edit_attributes(c, lambda m: m["teacher"].update(num_layers=2)),
     "train/cls: array has shape (160, 5, 32), the metadata says (160, 3, 32)"),
    (lambda c: edit_attributes(c, lambda m: m["splits"]["train"].update(num_examples=100)),
     "train/input_ids: array has shape (160, 24), the metadata says (100, 24)"),
    (lambda c: edit_array(c, "train/logits", lambda d: d.update(shape=[10 ** 12, 2])),
     "train/logits: array has shape (1000000000000, 2), the metadata says (160, 2)"),
    (lambda c: edit_array(c, "train/labels", lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[32])),
     "train/labels: array has chunks (32,), not the layout pkd-cache writes (64,)"),
    (lambda c: edit_array(c, "train/logits", lambda d: d["codecs"][0]["configuration"].update(endian="big")),
     "train/logits: array uses codecs ['bytes', 'blosc']"),
    (lambda c: edit_attributes(c, lambda m: m["task"].update(num_labels="2")),
     "metadata: task.num_labels '2' is not an integer in [1, 1,048,576]"),
    (lambda c: edit_attributes(c, lambda m: m.update(checksums={"file": "../../etc/passwd"})),
     "its checksum manifest is recorded as '../../etc/passwd'"),
])
def test_metadata_that_disagrees_with_the_arrays_is_refused(copy, edit, says):
    edit(copy)
    refused(copy, says)
    assert any(says.split(": ", 1)[-1][:40] in p for p in verify_problems(copy)), verify_problems(copy)


@pytest.mark.parametrize("arrays, axis, key", [("input_ids attention_mask token_type_ids", 1, "max_seq_length"),
                                               ("cls", 2, None)])
def test_crafted_widths_are_refused_before_a_buffer_is_made(copy, arrays, axis, key):
    """10^9 tokens per row (or a hidden size of 10^9), in the metadata and every array alike: a chunk would decode
    into a buffer of hundreds of GB, so the reader refuses the size instead of dying of MemoryError."""
    big = 10 ** 9
    edit_attributes(copy, lambda m: m.update(max_seq_length=big) if key else m["teacher"].update(hidden_size=big))
    for split in ("train", "validation"):
        for name in arrays.split():
            def widen(d):
                d["shape"][axis] = big
                d["chunk_grid"]["configuration"]["chunk_shape"][axis] = big
            edit_array(copy, f"{split}/{name}", widen)
    says = "max_seq_length 1000000000 is not an integer in [1, 1,048,576]" if key else \
        "teacher.hidden_size 1000000000 is not an integer in [1, 65,536]"
    refused(copy, says)
    assert verify_problems(copy) == [f"metadata: {says}"]


def test_crafted_sizes_are_refused_by_arithmetic_not_by_listing(copy):
    """10^12 rows in the metadata and in every array's shape: the manifest cannot hold the chunks that needs, so
    both distill and verify refuse at once (they used to hang or die of MemoryError)."""
    big = 10 ** 12
    edit_attributes(copy, lambda m: m["splits"]["train"].update(num_examples=big))
    for f in (copy / "train").glob("*/zarr.json"):
        doc = read_json(f)
        doc["shape"][0] = big
        write_json(f, doc)
    refused(copy, "the layout needs 187,500,000,012 chunks but the manifest records 48")
    assert verify_problems(copy)[0].startswith("checksums: the layout needs 187,500,000,012 chunks")


# --- 3 and 5. values: non-finite, labels and ids out of range, even with their checksums recomputed -----------------

@pytest.mark.parametrize("array, poke, says", [
    ("train/logits", lambda v: v.__setitem__((5, 1), np.nan), "holds 1 non-finite value(s)"),
    ("validation/logits", lambda v: v.__setitem__((0, 0), -np.inf), "holds 1 non-finite value(s)"),
    ("train/labels", lambda v: v.__setitem__(7, -100), "holds labels outside [0, 2) (e.g. -100)"),
    ("validation/labels", lambda v: v.__setitem__(3, 5), "holds labels outside [0, 2) (e.g. 5)"),
    ("train/input_ids", lambda v: v.__setitem__((2, 1), 999999), "holds token ids outside the vocabulary"),
    ("train/attention_mask", lambda v: v.__setitem__((2, 1), 2), "holds attention mask values other than 0/1"),
])
def test_bad_values_are_refused_even_with_a_recomputed_checksum(copy, array, poke, says):
    f = chunk_files(copy, array)[0]
    doc = read_json(copy / array / "zarr.json")
    values = decode(f, tuple(doc["chunk_grid"]["configuration"]["chunk_shape"]), doc["data_type"])
    poke(values)
    rewrite_chunk(copy, str(f.relative_to(copy)), values)
    refused(copy, says)
    assert any(says in p for p in verify_problems(copy))


def test_inf_in_one_cls_layer_is_refused(copy):
    f = copy / "train/cls/c/1/3/0"
    values = decode(f, (64, 1, 32), np.float16)
    values[10, 0, 4] = np.inf
    rewrite_chunk(copy, "train/cls/c/1/3/0", values)
    refused(copy, "chunk train/cls/c/1/3/0 holds 1 non-finite value(s)")


@pytest.mark.subprocess
@pytest.mark.slow
def test_distill_from_a_tampered_store_is_one_line_and_saves_nothing(copy, backbone_dir, tmp_path):
    values = decode(copy / "train/logits/c/2/0", (64, 2), np.float32)
    values[0, 0] = np.nan
    rewrite_chunk(copy, "train/logits/c/2/0", values)
    out = tmp_path / "student"
    p = subprocess.run([sys.executable, "-m", "pkd_cache", "distill", "--store", str(copy), "--output-dir", str(out),
                        "--student-layers", "2", "--student-init", str(backbone_dir), "--epochs", "1"],
                       env={**__import__("os").environ, **ENV_KEYS}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "chunk train/logits/c/2/0 holds 1 non-finite value(s)" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and not (out / "model.safetensors").exists()


# --- the property test: random allowed tampering -----------------------------------------------------------------

def _json_paths(copy: Path) -> list[Path]:
    return [copy / "zarr.json"] + sorted(copy.glob("*/*/zarr.json"))


def _set_random_leaf(doc, rng: random.Random):
    """Replace one random leaf (a number, string, bool, list) of a JSON document by a plausible other value."""
    path, node = [], doc
    while isinstance(node, (dict, list)) and node:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.2:
            break
        node = node[key]
    if not path:
        return "nothing"
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    old = parent[path[-1]]
    choices = [0, 1, -1, 2, 10 ** 12, 3.5, float("nan"), None, True, "", "float64", "int8", [], {}, [64, 1, 32],
               (old * 2 if isinstance(old, int) and not isinstance(old, bool) else "x")]
    parent[path[-1]] = rng.choice(choices)
    return f"{'/'.join(map(str, path))}: {old!r} -> {parent[path[-1]]!r}"


def _tamper(copy: Path, rng: random.Random) -> str:
    kind = rng.choice(["metadata", "array", "flip", "flip+crc", "delete", "swap+crc", "manifest", "values+crc"])
    if kind in ("metadata", "array"):
        f = copy / "zarr.json" if kind == "metadata" else rng.choice(_json_paths(copy)[1:])
        doc = read_json(f)
        what = _set_random_leaf(doc, rng)
        f.write_text(json.dumps(doc))  # NaN too: Python's json writes and reads it
        return f"{kind} {f.relative_to(copy)} {what}"
    files = sorted(read_json(copy / "checksums.json")["chunks"])
    key = rng.choice(files)
    f = copy / key
    if kind.startswith("flip"):
        data = bytearray(f.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
    elif kind == "delete":
        f.unlink()
    elif kind == "swap+crc":
        other = copy / rng.choice(files)
        f.write_bytes(other.read_bytes())
    elif kind == "manifest":
        manifest = read_json(copy / "checksums.json")
        if rng.random() < 0.5:
            del manifest["chunks"][key]
        else:
            manifest["chunks"][key][rng.randrange(2)] += 1
        write_json(copy / "checksums.json", manifest)
        return f"manifest entry {key}"
    elif kind == "values+crc":
        array = key.split("/c/")[0]
        doc = read_json(copy / array / "zarr.json")
        values = decode(f, tuple(doc["chunk_grid"]["configuration"]["chunk_shape"]), doc["data_type"])
        flat = values.reshape(-1)
        i = rng.randrange(flat.size)
        pick = rng.choice([np.nan, np.inf, -1, 10 ** 6, 2, 0] if values.dtype.kind == "f" else [-100, -1, 2, 5, 999999])
        with np.errstate(over="ignore"):  # 10^6 is inf in float16: also a bad value
            flat[i] = np.array(pick).astype(values.dtype) if values.dtype.kind != "f" else pick
        rewrite_chunk(copy, key, values)
        return f"{kind} {key}[{i}] = {flat[i]}"
    if kind.endswith("+crc") and f.exists():
        record_file(copy, key)
    return f"{kind} {key}"


def plausible(batches: dict, meta: dict) -> bool:
    """What a dump could have written: finite floats, labels in range, 0/1 masks, ids inside the vocabulary."""
    for batch in (b for split in batches.values() for b in split):
        if not all(torch.isfinite(batch[k]).all() for k in ("logits", "cls")):
            return False
        if batch["labels"].min() < 0 or batch["labels"].max() >= meta["task"]["num_labels"]:
            return False
        if batch["attention_mask"].max() > 1 or batch["input_ids"].max() >= meta["tokenizer"]["vocab_size"]:
            return False
    return True


@pytest.mark.slow
def test_random_tampering_is_refused_in_one_line_or_reads_exactly_the_original(store_path, tmp_path):
    """Random edits of the metadata, an array's metadata, the manifest or a chunk's bytes: every read (and verify)
    refuses with one line or reads exactly the original data. A chunk rewritten *with its checksum recomputed* is
    indistinguishable from an honest one when it decodes to plausible values, so there the promise is weaker and
    checked as such: refused, or every value read is one a dump could have written."""
    reference = everything(store_path)
    meta = pkd_cache.open_store(str(store_path)).info()
    rng = random.Random(14)
    outcomes = {"refused": 0, "identical": 0, "plausible": 0}
    for trial in range(80):
        copy = tmp_path / f"t{trial}.zarr"
        shutil.copytree(store_path, copy)
        edits = [_tamper(copy, rng) for _ in range(rng.choice([1, 1, 2]))]
        what, rechecksummed = "; ".join(edits), any("+crc" in e for e in edits)
        try:
            got = everything(copy)
        except pkd_cache.PkdCacheError as e:
            assert "\n" not in str(e) and str(e), what
            outcomes["refused"] += 1
        else:
            if same(got, reference):
                outcomes["identical"] += 1
            else:
                assert rechecksummed, f"trial {trial} ({what}) read other data than the original store"
                assert plausible(got, meta), f"trial {trial} ({what}) read values no dump writes"
                outcomes["plausible"] += 1
        try:
            report = verify_store(str(copy))
        except pkd_cache.PkdCacheError as e:
            assert "\n" not in str(e), what
        else:
            if report.ok:  # verify and the readers agree: a store verify passes reads without error
                everything(copy)
        shutil.rmtree(copy)
    assert outcomes["refused"] >= 40 and outcomes["identical"] >= 3, outcomes


def finiteness_checks():
    """The compiled one-pass check (store/_bits.c) where it was built, and the numpy passes it falls back to."""
    from pkd_cache.store import trust

    checks = {"numpy": trust.non_finite_numpy, "default": trust.non_finite}
    if trust._one_pass is not None:
        checks["compiled"] = lambda v: trust._one_pass(np.ascontiguousarray(v).reshape(-1), v.dtype.itemsize)
    return checks


@pytest.mark.parametrize("bits", [16, 32, 64])
@pytest.mark.parametrize("check", ["numpy", "default", "compiled"])
def test_the_bit_level_finiteness_check_agrees_with_isfinite_on_random_bit_patterns(bits, check):
    fn = finiteness_checks().get(check)
    if fn is None:
        pytest.skip("store/_bits.c was not built here")
    u, f = f"u{bits // 8}", f"f{bits // 8}"
    rng = np.random.default_rng(bits)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, np.finfo(f).max, np.finfo(f).min,
                        np.finfo(f).tiny, -np.finfo(f).tiny], f)
    special = np.concatenate([special, (special.view(u) | np.array(1, u)).view(f)])  # NaN payloads, subnormals
    with np.errstate(invalid="ignore"):
        for _ in range(2000):  # any bits, both signs, NaNs and infs included
            v = rng.integers(0, 2 ** 64, rng.integers(1, 6), dtype=np.uint64).astype(u).view(f)
            assert fn(v) == (not np.isfinite(v).all()), v.view(u)
        for x in special:
            assert fn(np.array([x])) == (not np.isfinite(x)), x
        # long arrays: one non-finite value before, at and after the compiled loop's 16,384-value block edges, and
        # in an unaligned view (a chunk decoded into a slice of a bigger buffer)
        big = rng.standard_normal(50_000).astype(f)
        assert not fn(big) and not fn(np.frombuffer(b"\0" + big.tobytes(), np.uint8)[1:].view(f))
        for at in (0, 16_383, 16_384, 32_768, 49_999):
            for bad in special[~np.isfinite(special)]:
                b = big.copy()
                b[at] = bad
                assert fn(b), (at, bad)
                assert fn(np.frombuffer(b"\0" + b.tobytes(), np.uint8)[1:].view(f)), (at, bad)
                assert fn(b.reshape(2, -1)[:, ::2]) == (at % 2 == 0), (at, bad)  # not contiguous


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_the_finiteness_check_reads_big_endian_floats_by_value(bits):
    """Stores are little-endian, but `non_finite` takes any float array: a byte-swapped one is checked by its
    values, not by its bytes read in native order."""
    from pkd_cache.store.trust import non_finite

    f = f"f{bits // 8}"
    for values, bad in (([1.0, -2.5, 0.0], False), ([1.0, np.inf], True), ([-np.inf, 3.0], True), ([np.nan], True)):
        for order in "<>":
            assert non_finite(np.array(values, np.dtype(f).newbyteorder(order))) == bad, (values, order)


def test_a_chunk_larger_than_a_blosc_frame_holds_is_refused(copy):
    """Widths inside the limits can still multiply into a chunk no Blosc frame holds (all 1,025 layers of a
    65,536-wide teacher in one chunk): refused before a buffer is made."""
    edit_attributes(copy, lambda m: m["teacher"].update(num_layers=1024, hidden_size=65536))
    for split, rows in (("train", 160), ("validation", 48)):
        def widen(d, rows=rows):
            d["shape"] = [rows, 1025, 65536]
            d["chunk_grid"]["configuration"]["chunk_shape"] = [min(64, rows), 1025, 65536]
        edit_array(copy, f"{split}/cls", widen)
    refused(copy, "train/cls: array has chunks (64, 1025, 65536) of more than 2,147,483,647 bytes")
