"""The pages `pkd-cache serve` shows people: an index of its stores, and a page per store at `/-/<store>`.

The index shows, per store: the task, the teacher (name, layers, hidden size), the splits and their counts, the
CLS dtype and the size, when and by whom it was made, whether it is complete and verified, and a
`pkd-cache distill --store <url>` line to copy. A store's page adds its metadata, the label distribution of each
split and the teacher's dev metric, computed from the stored logits. The same URLs answer JSON to
`Accept: application/json` or `?format=json`, for scripts.

Verification (`pkd-cache verify`: every chunk against its checksum) runs once per store in a background thread,
again only when the store's manifest changes; the pages say "verifying" until it is done.
"""
from __future__ import annotations

import html
import json
import threading
from pathlib import Path
from typing import Callable, Optional

from ..progress import quiet
from ..store.describe import human_bytes, logits_teacher, summary_holds, summary_splits

_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border-bottom:1px solid #ddd;padding:.4em .8em;text-align:left;vertical-align:top}th{background:#f4f4f4}
code{background:#f4f4f4;padding:.15em .35em;border-radius:3px;font-size:90%}.bad{color:#b00}.ok{color:#070}
.muted{color:#777}td:first-child,td:nth-child(7){white-space:nowrap}
</style>"""


def _esc(value) -> str:
    return html.escape(str(value))


class Verifier:
    """`verify` of each store, once per manifest version, on a background thread; `status` never blocks."""

    def __init__(self, verify: Callable[[str], object]):
        self.verify, self.results, self.lock = verify, {}, threading.Lock()

    def status(self, path: Path) -> str:
        key = (str(path), _stamp(path))
        with self.lock:
            if key not in self.results:
                self.results[key] = "verifying"
                threading.Thread(target=self._run, args=(key, path), daemon=True).start()
            return self.results[key]

    def _run(self, key, path: Path) -> None:
        try:
            with quiet():
                report = self.verify(str(path))
            status = "verified" if report.ok else f"{len(report.problems)} problem(s): run pkd-cache verify"
        except Exception as e:  # noqa: BLE001 - a store that cannot be opened is shown as such, not a crash
            status = f"cannot be verified: {' '.join(str(e).split())[:200]}"
        with self.lock:
            self.results[key] = status


def _stamp(path: Path) -> Optional[float]:
    try:
        return (path / "checksums.json").stat().st_mtime
    except OSError:
        return None


def _state(s: dict, verified: str) -> str:
    if not s.get("complete"):
        return '<span class="bad">unfinished (its dump has not completed)</span>'
    css = "ok" if verified == "verified" else "muted" if verified == "verifying" else "bad"
    return f'complete, <span class="{css}">{_esc(verified)}</span>'


def index_html(stores: list[dict], base: str, verified: dict[str, str]) -> str:
    """The served folder's stores as a page for people."""
    rows = []
    for s in stores:
        url = f"{base}/{s['name']}"
        splits = _esc(summary_splits(s, "\n")).replace("\n", "<br>")
        rows.append(
            f'<tr><td><a href="/-/{_esc(s["name"])}">{_esc(s["name"])}</a><br><span class="muted">id '
            f'{_esc(s.get("id") or "-")}</span></td><td>{_esc(s.get("task"))}</td>'
            f'<td>{_esc(s.get("teacher"))}<br><span class="muted">{s.get("layers")} layers, hidden '
            f'{s.get("hidden")}</span></td><td>{splits}</td><td>{_esc(summary_holds(s))}</td>'
            f'<td>{human_bytes(s["bytes"]) if s.get("bytes") is not None else "?"}</td>'
            f'<td>{_esc(str(s.get("created_at") or "-").replace("T", " ")[:16])}<br><span class="muted">'
            f'{_esc(s.get("created_by") or "")}</span></td><td>{_state(s, verified.get(s["name"], ""))}</td>'
            f'<td><code>{_esc(_distill_line(s, url))}</code></td>'
            f'</tr>')
    body = "".join(rows) or '<tr><td colspan="9" class="muted">no stores here yet</td></tr>'
    return (f"<!doctype html><meta charset=utf-8><title>pkd-cache stores</title>{_STYLE}<h1>pkd-cache stores</h1>"
            f"<p class=muted>{len(stores)} store(s). JSON: <code>?format=json</code>.</p><table><tr><th>store</th>"
            f"<th>task</th><th>teacher</th><th>splits</th><th>holds</th><th>size</th><th>created</th><th>state</th>"
            f"<th>distill from it</th></tr>{body}</table>")


def _distill_line(s: dict, url: str) -> str:
    """The command that distils from a store: 3 student layers from a sentence store (PKD's BERT3), half the
    teacher's blocks from a token store."""
    layers = max(1, int(s.get("layers") or 2) // 2) if s.get("unit") == "tokens" else 3
    return f"pkd-cache distill --store {url} --student-layers {layers} --output-dir student/"


def store_detail(path: Path, summary: dict, verified: str) -> dict:
    """Everything a store's page shows: its summary, metadata, label counts and the teacher's dev metric."""
    from ..store.reader import open_store

    store = open_store(str(path), require_complete=False)
    meta = store.info()
    task = meta.get("task") or {}
    names = list(task.get("label_names") or [])
    labels, metric, tokens = {}, {}, {}
    if summary.get("unit") == "tokens":  # a token store: no labels, no logits per example
        tokens = {split: {"tokens": v.get("num_tokens"), "sequences": v.get("num_sequences")}
                  for split, v in (meta.get("splits") or {}).items()}
    elif store.complete:
        import numpy as np

        for split in store.meta.splits:
            y = store.array(split, "labels")[:]
            if task.get("is_regression"):
                labels[split] = {"mean": float(np.mean(y)), "std": float(np.std(y))}
            else:
                counts = np.bincount(y.astype(np.int64), minlength=len(names))
                labels[split] = {(names[i] if i < len(names) else str(i)): int(c) for i, c in enumerate(counts)}
            if split in (task.get("dev_splits") or []):
                logits = store.array(split, "logits")[:]
                if task.get("is_regression"):
                    metric[split] = {"pearson": float(np.corrcoef(logits[:, 0], y)[0, 1])}
                else:
                    metric[split] = {"accuracy": float((logits.argmax(axis=1) == y).mean())}
    return {**summary, "state": verified if store.complete else "unfinished", "labels": labels,
            "teacher_dev_metric": metric, **({"tokens": tokens} if tokens else {}),
            "metadata": {k: v for k, v in meta.items() if k != "cache_key_parts"}}


def store_html(d: dict, base: str) -> str:
    url = f"{base}/{d['name']}"
    t = d["metadata"].get("teacher") or {}
    tokens = d.get("unit") == "tokens"
    head = [("task", d.get("task")), ("teacher (its logits)", logits_teacher(t)),
            ("layers x hidden", f"{d.get('layers')} x {d.get('hidden')}"),
            ("per token" if tokens else "cls dtype", summary_holds(d)),
            ("size", human_bytes(d["bytes"]) if d.get("bytes") is not None else "?"),
            ("created", f"{d.get('created_at')} by {d.get('created_by') or '?'}"), ("state", d.get("state")),
            ("id", d.get("id") or "-")]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in head)
    if tokens:
        counts = "".join(f"<tr><td>{_esc(split)}</td><td>{v['tokens']:,}</td><td>{v['sequences']:,}</td></tr>"
                         for split, v in d.get("tokens", {}).items())
        body = (f"<h2>Splits</h2><table><tr><th>split</th><th>tokens</th><th>sequences</th></tr>{counts}</table>")
    else:
        def cells(values: dict, number) -> str:
            return _esc(", ".join(f"{k} {number(v)}" for k, v in values.items()))

        count = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:.3f}"  # noqa: E731 - a label count, or mean/std
        labels = "".join(f"<tr><td>{_esc(split)}</td><td>{cells(c, count)}</td></tr>"
                         for split, c in d["labels"].items())
        metric = "".join(f"<tr><td>{_esc(split)}</td><td>{cells(m, lambda v: f'{v:.4f}')}</td></tr>"
                         for split, m in d["teacher_dev_metric"].items())
        body = (f"<h2>Labels</h2><table><tr><th>split</th><th>counts</th></tr>{labels}</table>"
                f"<h2>Teacher on the dev splits</h2><p class=muted>from the stored logits</p><table><tr><th>split</th>"
                f"<th>metric</th></tr>{metric}</table>")
    return (f"<!doctype html><meta charset=utf-8><title>{_esc(d['name'])} - pkd-cache</title>{_STYLE}"
            f"<p><a href=\"/\">all stores</a></p><h1>{_esc(d['name'])}</h1>"
            f"<p><code>{_esc(_distill_line(d, url))}</code></p><table>{rows}</table>{body}"
            f"<h2>Metadata</h2><pre>{_esc(json.dumps(d['metadata'], indent=1))}</pre>")
