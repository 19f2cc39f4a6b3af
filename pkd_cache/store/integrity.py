"""Are a store's files the bytes its dump wrote? CRC-32C checksums, the manifest that records them, and the journal's
per-chunk records an unfinished dump keeps (the same records, before `finish` folds them into the manifest).

    <store>/checksums.json                             {"algorithm": "crc32c", "chunks": {key: [nbytes, crc32c]}}
    <store>/.pkd_cache/progress/<split>/<chunk>.json   {file key: [nbytes, crc32c]} of one chunk's files, written
                                                       (atomically) only after all of them are in place

Every chunk file a backend reads comes through `ChunkFiles.read`, the one place a file is compared with the manifest.
A chunk counts as durable (a resumed dump keeps it) only if its record exists and every file it lists is there with
the recorded size and CRC; anything else a crash left behind is redone.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, Optional

from ..errors import PkdCacheError
from .format import JOURNAL

CHECKSUMS_KEY = "checksums.json"  # {"algorithm": "crc32c", "chunks": {"train/cls/c/0/3/0": [nbytes, crc32c]}}
PROGRESS = f"{JOURNAL}/progress"
NO_MANIFEST = ("has no checksum manifest (checksums.json): it was written before pkd-cache recorded checksums, or "
               "the manifest was removed; re-dump it, or pass --allow-no-checksums to read it without checking its "
               "chunks against checksums")
NO_MANIFEST_NOTE = ("no checksum manifest (--allow-no-checksums): every chunk was decoded and its values checked, but "
                    "corruption that still decodes to plausible values goes unseen")


class ChunkError(PkdCacheError):
    """A chunk that is missing, corrupt or undecodable: names the store and the chunk; `reason` says what."""

    def __init__(self, location, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"store {location}: chunk {key} {reason}; run `pkd-cache verify {location}`")


def crc32c(data: bytes) -> int:
    import google_crc32c  # a zarr dependency; hardware CRC-32C (>10 GB/s)

    return int(google_crc32c.value(bytes(data) if not isinstance(data, (bytes, bytearray)) else data))


def checksum(data: bytes) -> list[int]:
    """A file's record: [nbytes, crc32c]."""
    return [len(data), crc32c(data)]


def _agrees(data: bytes, record) -> bool:
    return len(data) == record[0] and crc32c(data) == record[1]


class ChunkFiles:
    """A store's chunk files, each compared with the manifest as it is read (nothing to compare with when the store
    has none: `checksums` None, a store opened with --allow-no-checksums)."""

    def __init__(self, location, checksums: Optional[dict]):
        self.location, self.checksums = location, checksums

    def read(self, key: str) -> bytes:
        try:
            data = self.location.read(key)
        except FileNotFoundError:
            raise ChunkError(self.location, key, "is missing") from None
        check_recorded(self.location, key, data, self.checksums)
        return data


def check_recorded(location, key: str, data: bytes, checksums: Optional[dict]) -> None:
    """A chunk file's bytes against the manifest (nothing to compare with when the store has none)."""
    if checksums is None:
        return
    recorded = checksums.get(key)
    if recorded is None:
        raise ChunkError(location, key, "is not in the store's checksum manifest")
    if not _agrees(data, recorded):
        raise ChunkError(location, key, "is corrupt (its checksum does not match the one recorded at dump time)")


def write_manifest(location, checksums: dict, metadata: dict) -> None:
    """Write `checksums.json` and record it in the metadata (before the complete flag is set)."""
    manifest = {"algorithm": "crc32c", "chunks": dict(sorted(checksums.items()))}
    location.write(CHECKSUMS_KEY, json.dumps(manifest, separators=(",", ":")).encode())
    metadata["checksums"] = {"file": CHECKSUMS_KEY, "algorithm": "crc32c", "chunks": len(checksums)}


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_manifest(location, meta: dict) -> Optional[dict]:
    """{chunk key: [nbytes, crc32c]} from checksums.json, or None when the store has none and its metadata
    records none. A manifest the metadata records but that is missing or malformed raises."""
    recorded = meta.get("checksums")
    key = recorded.get("file", CHECKSUMS_KEY) if isinstance(recorded, dict) else CHECKSUMS_KEY
    if key != CHECKSUMS_KEY:
        raise PkdCacheError(f"store {location}: its checksum manifest is recorded as {key!r}; pkd-cache reads only "
                            f"{CHECKSUMS_KEY}")
    try:
        doc = json.loads(location.read(key))
    except FileNotFoundError:
        if recorded:
            raise PkdCacheError(f"store {location}: its checksum manifest {key} is missing; the store is damaged "
                                f"(run `pkd-cache verify {location}`)") from None
        return None  # and none recorded: a store of 0.1.0, or one whose record was removed too
    except ValueError as e:
        raise PkdCacheError(f"store {location}: its checksum manifest {key} is not valid JSON ({e})") from e
    chunks = doc.get("chunks") if isinstance(doc, dict) else None
    if doc.get("algorithm") != "crc32c" or not isinstance(chunks, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(_count(x) for x in v) for v in chunks.values()):
        raise PkdCacheError(f"store {location}: its checksum manifest {key} is malformed (expected crc32c and "
                            f"{{chunk: [nbytes, crc32c]}})")
    return chunks


def manifest_problems(expected: dict[str, int], keys: Callable[[], Iterable[str]], manifest: dict) -> list[str]:
    """The manifest against the layout: `expected` is {array: chunk count} (`train/cls`), `keys()` yields every
    expected key. The counts are compared first, so a crafted size never makes a list of 10^9 keys.

    Records under a split folder the metadata does not list are not the layout's and never read: `dump --add-split`
    writes the grown manifest just before the metadata that lists the new split (commands/dump_extend.py), so a
    store stopped between the two writes holds such records, and reads exactly as before the extension."""
    need, have = sum(expected.values()), len(manifest)
    if need > have:
        return [f"checksums: the layout needs {need:,} chunks but the manifest records {have:,} (the metadata "
                f"promises more data than the store holds)"]
    missing, seen = [], 0
    for key in keys():
        if key in manifest:
            seen += 1
        else:
            missing.append(key)
    problems = []
    if missing:
        problems.append(f"checksums: {len(missing)} chunk(s) of the layout are not in the manifest, e.g. {missing[0]}")
    splits = {array.split("/", 1)[0] for array in expected}
    extra = sorted(k for k in set(manifest) - set(keys()) if k.split("/", 1)[0] in splits) if have > seen else []
    if extra:
        problems.append(f"checksums: {len(extra)} recorded chunk(s) belong to no array, e.g. {extra[0]}")
    return problems


def file_problems(location, manifest: dict) -> list[str]:
    """Every chunk the manifest records is a local file of the recorded size (a stat each: cheap, and it finds a
    half-written store before training starts rather than mid-epoch)."""
    missing, wrong = [], []
    for key, (nbytes, _) in manifest.items():
        try:
            size = (location.local / key).stat().st_size
        except FileNotFoundError:
            missing.append(key)
            continue
        if size != nbytes:
            wrong.append(f"{key} has {size:,} bytes, the manifest records {nbytes:,}")
    out = [f"{len(missing)} chunk(s) the manifest records are missing, e.g. {missing[0]}"] if missing else []
    return out + ([f"{len(wrong)} chunk(s) differ in size from the manifest, e.g. {wrong[0]}"] if wrong else [])


def record_chunk(location, split: str, chunk: int, checksums: dict[str, list[int]]) -> None:
    """Journal chunk `chunk` of `split` as durable: its files' records, once all of them are in place."""
    location.write(f"{PROGRESS}/{split}/{chunk:06d}.json", json.dumps(checksums).encode())


def durable_count(location) -> int:
    """How many chunks an unfinished store's journal records as durable, over every split (not checked: a
    progress figure for someone waiting on the dump)."""
    return sum(1 for split in location.list(PROGRESS) for name in location.list(f"{PROGRESS}/{split}")
               if name.endswith(".json"))


def durable_chunks(location, split: str) -> dict[int, dict[str, list[int]]]:
    """{chunk: its files' checksums} for the chunks of `split` whose record and files check out."""
    out = {}
    for name in location.list(f"{PROGRESS}/{split}"):
        if not name.endswith(".json"):
            continue
        try:
            record = json.loads(location.read(f"{PROGRESS}/{split}/{name}"))
            ok = all(_present(location, key, [n, crc]) for key, (n, crc) in record.items())
        except (OSError, ValueError, TypeError):
            ok = False
        if ok:
            out[int(name[:-5])] = record
    return out


def _present(location, key: str, record) -> bool:
    try:
        data = location.read(key)
    except FileNotFoundError:
        return False
    return _agrees(data, record)
