"""Describing stores: the `pkd-cache info` table and the one-row summary that `ls` and `serve` list."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.table import Table

from .cache import ID_DIGITS

if TYPE_CHECKING:  # `ls` and `serve` only summarise metadata: no reader, no numpy
    from .reader import Store


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def logits_teacher(teacher: dict) -> str:
    """The teacher whose logits the store holds: the one given to dump, or the one dump fine-tuned from it."""
    tuned = teacher.get("finetuned_by_dump")
    if tuned:
        return f"{tuned} (fine-tuned by dump from {teacher.get('name_or_path')})"
    return str(teacher.get("name_or_path"))


def print_info(store: Store) -> None:
    m = store.info()
    t, tok, task = m.get("teacher", {}), m.get("tokenizer", {}), m.get("task", {})
    console = Console()
    head = Table(show_header=False, box=None)
    rows = [
        ("store", store.path),
        ("complete", "yes" if m.get("complete") else "NO (dump unfinished)"),
        ("format", f"{m.get('format')} v{m.get('format_version')}, {store.store_format} "
                   f"(pkd-cache {m.get('package_version')})"),
        ("task", f"{task.get('name')}  labels: {', '.join(task.get('label_names') or ['(regression)'])}"),
        ("teacher", f"{logits_teacher(t)}  ({t.get('num_layers')} layers, hidden {t.get('hidden_size')})"),
        ("base model", t.get("base_model") or "unknown (distill needs --student-init)"),
        ("teacher weights", str(t.get("weights_fingerprint", ""))[:16]),
        ("tokenizer", f"{tok.get('name_or_path')}  vocab {tok.get('vocab_size')}  "
                      f"fingerprint {str(tok.get('vocab_fingerprint', ''))[:16]}"),
        ("max length", str(m.get("max_seq_length"))),
        ("cls dtype", str(m.get("cls_dtype"))),
        ("id", str(m.get("cache_key") or "-")[:ID_DIGITS]),
        ("created", f"{m.get('created_at')}" + (f" by {m['created_by']}" if m.get("created_by") else "")),
        ("completed", str(m.get("completed_at", "-"))),
        ("size on disk", human_bytes(store.size_bytes())),
    ]
    tokens = m.get("layout") == "tokens" and isinstance(m.get("lm"), dict)
    if tokens:  # a token store (dump --task lm): what each token holds, instead of labels and [CLS]
        lm, spec = m["lm"], m["lm"].get("targets") or {}
        rows[3] = ("task", "lm (an encoder's hidden states, per token)" if lm.get("teacher_kind") == "encoder"
                   else "lm (next-token targets of a causal LM, per token)")
        rows[9] = ("per token", f"logits {spec.get('kind')}" + (f":{spec.get('count')} (seed {spec.get('seed')}, T "
                                f"{spec.get('temperature')})" if spec.get("kind") != "none" else "") +
                   (f"; hidden layers {lm.get('hidden_layers')} ({lm.get('hidden_dtype')})" if lm.get("hidden_layers")
                    else "") + f"; {lm.get('sequence_mode')} sequences, {lm.get('chunk_tokens'):,} tokens per chunk")
    for k, v in rows:
        head.add_row(f"[bold]{k}", v)
    console.print(head)
    splits = Table("split", "tokens" if tokens else "examples", *(("sequences",) if tokens else ()), "source",
                   "data fingerprint", title="splits")
    for name, s in m.get("splits", {}).items():
        counts = (f"{s.get('num_tokens'):,}", f"{s.get('num_sequences'):,}") if tokens \
            else (f"{s.get('num_examples'):,}",)
        splits.add_row(name, *counts, str(s.get("source")), str(s.get("data_fingerprint"))[:16])
    console.print(splits)


def summary_from_meta(name: str, meta: dict, size: Optional[int]) -> dict:
    """One store's row in `ls` and `serve`. A token store (`layout` "tokens") counts its splits in tokens and says
    what it holds per token (`per_token`: the logit spec, and the hidden states' dtype) where a store of examples
    gives its [CLS] dtype."""
    teacher = meta.get("teacher", {})
    lm = meta.get("lm") if meta.get("layout") == "tokens" and isinstance(meta.get("lm"), dict) else None
    count = "num_tokens" if lm else "num_examples"
    return {"name": name, "task": meta.get("task", {}).get("name"), "teacher": logits_teacher(teacher),
            "layers": teacher.get("num_layers"), "hidden": teacher.get("hidden_size"),
            "splits": {s: v.get(count) for s, v in meta.get("splits", {}).items()},
            "unit": "tokens" if lm else "examples", "cls_dtype": None if lm else meta.get("cls_dtype"),
            **({"per_token": _per_token(lm)} if lm else {}), "bytes": size, "complete": bool(meta.get("complete")),
            "created_at": meta.get("created_at"), "created_by": meta.get("created_by"),
            "cache_key": meta.get("cache_key"), "id": str(meta.get("cache_key") or "")[:ID_DIGITS] or None}


def _per_token(lm: dict) -> str:
    spec = lm.get("targets") or {}
    logits = str(spec.get("kind")) + (f":{spec.get('count')}" if spec.get("kind") in ("sample", "topk") else "")
    return logits + (f", hidden {lm.get('hidden_dtype')}" if lm.get("hidden_layers") else "")


def summary_holds(s: dict) -> str:
    """The "holds" cell of a summary: per token for a token store, else the [CLS] dtype."""
    return str(s.get("per_token") or s.get("cls_dtype"))


def summary_splits(s: dict, sep: str = ", ") -> str:
    """A summary's split counts, "train 9,815" (examples) or "train 844,060 tokens"."""
    unit = " tokens" if s.get("unit") == "tokens" else ""
    splits = (s.get("splits") or {}).items()
    return sep.join(f"{k} {v:,}{unit}" if isinstance(v, int) else f"{k} {v}" for k, v in splits)
