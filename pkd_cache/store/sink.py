"""What every backend's writer shares: the single-writer lock, each chunk's checksums recorded once its files are in
place (store/integrity.py), the chunks a resumed dump finds durable, and the manifest then the complete flag."""
from __future__ import annotations

from typing import Optional

from ..errors import PkdCacheError
from .format import JOURNAL, now
from .integrity import PROGRESS, durable_chunks, load_manifest, record_chunk, write_manifest
from .journal import WriterLock, remove_partial_files
from .location import Location


class ChunkedWriter:
    """The base of a backend's `sink`: subclasses create the arrays, write chunks (calling `_record` once a chunk's
    files are all in place) and store the metadata (`_write_meta`, `complete` written by `finish` last)."""

    location: Location
    metadata: dict

    def _start(self, location: Location, resume: bool, attach: bool = False, extend: Optional[dict] = None) -> None:
        """`extend`: the metadata of the complete store this writer adds splits to (`dump --add-split`). What it
        holds is kept as it is: its manifest is carried over, and its metadata is rewritten only by `finish`."""
        self.location = location
        self.lock = WriterLock(location)
        if not attach:  # an attached writer (another rank of one dump) works under rank 0's lock
            self.lock.acquire()
        self.checksums: dict[str, list[int]] = {}
        self.durable: dict[str, set[int]] = {}
        self.resumed = resume or attach
        self.extending = extend is not None
        if resume and not attach:
            remove_partial_files(location)  # files a killed writer did not finish renaming into place
        if extend is not None:
            manifest = load_manifest(location, extend)
            if manifest is None:
                self.lock.release()
                raise PkdCacheError(f"{location} has no checksum manifest (written by pkd-cache 0.1.0): a split "
                                    f"cannot be added to it; dump it again")
            self.checksums.update(manifest)
            remove_partial_files(location)

    def _new_split_folder(self, split: str) -> None:
        """Before an extension writes `split`: it must be new, and what an interrupted extension left of it (not
        in the metadata, never read) is removed."""
        if split in self.metadata["splits"]:
            raise PkdCacheError(f"{self.location} already holds split {split!r}")
        self.location.remove(split)
        self.location.remove(f"{PROGRESS}/{split}")

    def _resumed_metadata(self, old: dict, new: dict) -> dict:
        """The first dump's metadata, with this resumption recorded."""
        meta = {**old, "resumptions": [*old.get("resumptions", []), now()]}
        meta["settings"] = new.get("settings", old.get("settings"))
        return meta

    def report(self) -> dict:
        """What this rank of a multi-rank dump wrote (JSON, for `distributed.gather`): its chunks' checksums and the
        chunks it holds durable."""
        return {"checksums": self.checksums, "durable": {s: sorted(c) for s, c in self.durable.items()}}

    def merge(self, reports: list[dict]) -> None:
        """Rank 0: every rank's `report` folded into this writer, before `finish` writes the manifest."""
        for r in reports:
            self.checksums.update({k: list(v) for k, v in r["checksums"].items()})
            for split, chunks in r["durable"].items():
                self.durable.setdefault(split, set()).update(chunks)

    def load_durable(self, split: str) -> set[int]:
        """Chunks of `split` that an earlier, interrupted dump made durable (empty for a fresh store)."""
        records = durable_chunks(self.location, split) if self.resumed else {}
        for record in records.values():
            self.checksums.update(record)
        self.durable[split] = set(records)
        return self.durable[split]

    def _record(self, split: str, chunk: int, files: dict[str, list[int]]) -> None:
        self.checksums.update(files)
        record_chunk(self.location, split, chunk, files)
        self.durable.setdefault(split, set()).add(chunk)

    def durable_examples(self) -> int:
        rows = self.metadata["chunk_size"]
        return sum(min(rows, self.metadata["splits"][s]["num_examples"] - c * rows)
                   for s, chunks in self.durable.items() for c in chunks)

    def finish(self) -> None:
        """Write the checksum manifest and the metadata, then the complete flag (the backend's `_write_complete`:
        one atomic write, or a separate last one), then drop the journal."""
        write_manifest(self.location, self.checksums, self.metadata)
        self._write_complete()
        self.close()
        self.location.remove(JOURNAL)  # progress folded into checksums.json, lock released: the store is complete

    def _write_complete(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the lock (after `finish`, or when the dump stops early: the store stays resumable)."""
        self.lock.release()
