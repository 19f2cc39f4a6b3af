"""Plain-text corpora for causal-LM caches: loading (txt, JSONL, Parquet), the three sequence modes, the empty
corpus, id dtypes, token-budget batches and the causal shift. A word-level tokenizer built here: one token a word."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pkd_cache.data.corpus import (IGNORE, id_dtype, load_corpus, shift_for_causal_lm, token_budget_batches,
                                   tokenize_corpus)
from pkd_cache.errors import PkdCacheError

WORDS = ["[UNK]", "</s>", "<s>"] + "the cat sat on a mat dog ran far away and then slept".split()
DOCS = ["the cat sat on the mat", "a dog ran far away", "and then slept", "the cat ran"]  # 6, 5, 3, 3 words


def make_tokenizer(bos: bool = False, eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # as Llama: BOS before each document
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    kw = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", **kw)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids_of(doc: str) -> list[int]:
    return [WORDS.index(w) for w in doc.split()]


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(PkdCacheError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_txt(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


# --- loading ----------------------------------------------------------------------------------------------------------

def test_txt_is_one_document_per_line_without_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"the cat sat on the mat\r\n\r\na dog ran far away\n   \n  and then slept\nthe cat ran")
    corpus = load_corpus([str(path)])
    assert corpus.documents == [DOCS[0], DOCS[1], "  and then slept", DOCS[3]]  # leading spaces kept, no line breaks
    assert corpus.where(1) == f"{path} line 3" and corpus.where(3) == f"{path} line 6"


def test_formats_give_the_same_documents_and_fingerprint(tmp_path):
    txt = load_corpus([write_txt(tmp_path / "c.txt", DOCS)])
    jsonl = load_corpus([write_jsonl(tmp_path / "c.jsonl", [{"id": i, "body": d} for i, d in enumerate(DOCS)])],
                        text_column="body")
    parquet = load_corpus([write_parquet(tmp_path / "c.parquet", {"text": DOCS, "n": list(range(4))})])
    assert txt.documents == jsonl.documents == parquet.documents == DOCS
    assert txt.fingerprint() == jsonl.fingerprint() == parquet.fingerprint()
    assert parquet.where(2) == f"{tmp_path / 'c.parquet'} row 2"
    # boundaries count: the same text split differently is other content
    assert load_corpus([write_txt(tmp_path / "d.txt", [" ".join(DOCS)])]).fingerprint() != txt.fingerprint()


def test_several_files_in_order_and_max_documents(tmp_path):
    a, b = write_txt(tmp_path / "a.txt", DOCS[:2]), write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in DOCS[2:]])
    corpus = load_corpus([a, b])
    assert corpus.documents == DOCS and corpus.sources == [a, b]
    assert corpus.where(1) == f"{a} line 2" and corpus.where(2) == f"{b} line 1"
    assert load_corpus([a, b], max_documents=3).documents == DOCS[:3]
    assert load_corpus([a, b], max_documents=1).sources == [a]
    assert "must be > 0" in error_of(load_corpus, [a], max_documents=0)


def test_missing_column_names_file_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}, {"text": DOCS[1]}, {"body": DOCS[2]}])
    message = error_of(load_corpus, [path])
    assert message.startswith(f"{path} line 3: no field 'text'") and "--text-column" in message
    parquet = write_parquet(tmp_path / "c.parquet", {"body": DOCS})
    assert error_of(load_corpus, [parquet]).startswith(f"{parquet}: no column 'text' (found: body)")
    assert "no value in column 'text'" in error_of(load_corpus, [write_jsonl(tmp_path / "n.jsonl", [{"text": None}])])
    assert "not text" in error_of(load_corpus, [write_jsonl(tmp_path / "i.jsonl", [{"text": 3}])])


def test_bad_paths_are_one_line(tmp_path):
    assert "no such file" in error_of(load_corpus, [str(tmp_path / "missing.jsonl")])
    assert "no such file" in error_of(load_corpus, ["corpus.txt"])
    assert "is a directory" in error_of(load_corpus, [str(tmp_path)])
    (tmp_path / "c.csv").write_text("text\nhi\n")
    assert "unsupported file type .csv" in error_of(load_corpus, [str(tmp_path / "c.csv")])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    assert "line 2: not valid JSON" in error_of(load_corpus, [str(tmp_path / "bad.jsonl")])


def test_hub_name_goes_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus(["Salesforce/wikitext:wikitext-2-raw-v1/validation"], max_documents=2)
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation[:2]")
    assert corpus.documents == DOCS[:2]
    assert corpus.where(1) == "hub:Salesforce/wikitext:wikitext-2-raw-v1/validation row 1"
    load_corpus(["wikitext/test"]), load_corpus(["owner/name"])
    assert calls[-2:] == [("wikitext", None, "test"), ("owner/name", None, "train")]

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach the hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert "Couldn't reach the hub. Offline?" in error_of(load_corpus, ["wikitext"])


# --- the three modes --------------------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    return load_corpus([write_txt(tmp_path / "c.txt", DOCS)])


def test_pack_is_the_stream_with_eos_cut_in_equal_sequences(tokenizer, corpus):
    stream = [i for d in DOCS for i in ids_of(d) + [WORDS.index("</s>")]]  # 6+5+3+3 words + 4 eos = 21 tokens
    tc = tokenize_corpus(tokenizer, corpus, 8, "pack")
    assert tc.input_ids.tolist() == stream and tc.input_ids.dtype == np.uint8
    assert tc.offsets.tolist() == [0, 8, 16, 21] and tc.offsets.dtype == np.int64  # the short remainder is kept
    assert (tc.num_tokens, tc.num_sequences, tc.truncated, tc.mode) == (21, 3, 0, "pack")
    assert tokenize_corpus(tokenizer, corpus, 7, "pack").offsets.tolist() == [0, 7, 14, 21]
    # tokenising in blocks gives the same result
    assert tokenize_corpus(tokenizer, corpus, 8, "pack", block=3).input_ids.tolist() == stream


def test_pack_without_eos_token_just_concatenates(corpus):
    tc = tokenize_corpus(make_tokenizer(eos=False), corpus, 100, "pack")
    assert tc.input_ids.tolist() == [i for d in DOCS for i in ids_of(d)] and tc.offsets.tolist() == [0, 17]


def test_cut_truncates_each_document_and_counts(tokenizer, corpus):
    tc = tokenize_corpus(tokenizer, corpus, 4, "cut", block=2)
    assert tc.offsets.tolist() == [0, 4, 8, 11, 14]
    assert tc.input_ids.tolist() == ids_of(DOCS[0])[:4] + ids_of(DOCS[1])[:4] + ids_of(DOCS[2]) + ids_of(DOCS[3])
    assert tc.truncated == 2 and "(2 cut)" in tc.summary(4)


def test_none_keeps_documents_and_refuses_a_long_one(tokenizer, corpus, tmp_path):
    tc = tokenize_corpus(tokenizer, corpus, 6, "none")
    assert tc.offsets.tolist() == [0, 6, 11, 14, 17] and tc.truncated == 0
    assert tc.input_ids.tolist() == [i for d in DOCS for i in ids_of(d)]  # no eos outside "pack"
    message = error_of(tokenize_corpus, tokenizer, corpus, 5, "none")
    assert message.startswith(f"document 0 ({tmp_path / 'c.txt'} line 1) has 6 tokens, more than --max-seq-length 5")


def test_bos_is_kept_and_documents_of_only_specials_are_dropped(tmp_path):
    tok = make_tokenizer(bos=True)
    corpus = load_corpus([write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[2]}, {"text": ""}, {"text": DOCS[3]}])])
    tc = tokenize_corpus(tok, corpus, 10, "cut")
    assert tc.input_ids.tolist() == [2] + ids_of(DOCS[2]) + [2] + ids_of(DOCS[3]) and tc.dropped == 1
    assert tokenize_corpus(tok, corpus, 10, "pack").input_ids.tolist() == [2] + ids_of(DOCS[2]) + [1, 2] \
        + ids_of(DOCS[3]) + [1]


def test_bad_modes_and_lengths(tokenizer, corpus):
    assert "unknown sequence mode" in error_of(tokenize_corpus, tokenizer, corpus, 8, "split")
    assert "too short" in error_of(tokenize_corpus, tokenizer, corpus, 1, "pack")


# --- the empty corpus -------------------------------------------------------------------------------------------------

def test_empty_corpus_is_one_line(tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "the corpus is empty" in error_of(load_corpus, [str(tmp_path / "empty.txt")])
    assert "the corpus is empty" in error_of(load_corpus, [write_txt(tmp_path / "blank.txt", ["", "  ", "\t"])])
    assert "the corpus is empty" in error_of(load_corpus, [write_jsonl(tmp_path / "e.jsonl", [])])
    blank_docs = load_corpus([write_jsonl(tmp_path / "b.jsonl", [{"text": ""}, {"text": "  "}])])
    for mode in ("pack", "cut", "none"):
        assert "the corpus is empty" in error_of(tokenize_corpus, tokenizer, blank_docs, 8, mode)


# --- id dtypes --------------------------------------------------------------------------------------------------------

def test_id_dtype_is_the_smallest_unsigned_that_holds_the_vocabulary():
    assert id_dtype(256) == np.uint8 and id_dtype(257) == np.uint16
    assert id_dtype(50257) == np.uint16 and id_dtype(65536) == np.uint16 and id_dtype(65537) == np.uint32
    assert id_dtype(128256) == np.uint32 and id_dtype(2**32) == np.uint32 and id_dtype(2**32 + 1) == np.uint64


# --- token-budget batches ---------------------------------------------------------------------------------------------

LENGTHS = np.random.default_rng(0).integers(1, 60, size=200)
OFFSETS = np.concatenate([[0], np.cumsum(LENGTHS)])


def plan(**kw) -> list[list[int]]:
    args = {"offsets": OFFSETS, "max_tokens": 128, "seed": 1, "epoch": 0} | kw
    return [b.tolist() for b in token_budget_batches(**args)]


def test_batches_cover_every_sequence_once_within_the_budget():
    batches = plan()
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(0 < LENGTHS[b].sum() <= 128 for b in batches)
    # greedy: a batch ends only where the next sequence would not fit
    assert all(LENGTHS[b].sum() + LENGTHS[c[0]] > 128 for b, c in zip(batches, batches[1:]))


def test_batches_are_seeded_per_epoch():
    assert plan() == plan()
    assert plan() != plan(epoch=1) and plan() != plan(seed=2)
    assert sorted(i for b in plan(epoch=1) for i in b) == list(range(200))


def test_resuming_gives_the_tail_of_the_uninterrupted_run():
    full = plan(rank=1, world=3)
    assert plan(rank=1, world=3, start_batch=5) == full[5:]
    assert plan(start_batch=len(plan())) == []


def test_ranks_are_disjoint_and_equal():
    n = len(plan())
    for world in (2, 3, 4):
        shares = [plan(rank=r, world=world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == n // world
        seen = [i for s in shares for b in s for i in b]
        assert len(seen) == len(set(seen))
        # rank r takes every world-th batch; only the last n % world batches are left out
        assert [b for s in zip(*shares) for b in s] == plan()[:n - n % world]
    world = next(w for w in (2, 3, 4, 5, 6, 7) if n % w == 0)  # no remainder: every sequence exactly once
    shares = [plan(rank=r, world=world) for r in range(world)]
    assert sorted(i for s in shares for b in s for i in b) == list(range(200))


def test_a_sequence_over_the_budget_is_one_line():
    message = error_of(lambda: list(token_budget_batches(OFFSETS, 40, 0, 0)))
    assert message.startswith(f"sequence {int(np.argmax(LENGTHS > 40))} has") and "at least 59 tokens" in message
    assert "rank 2 of 2" in error_of(lambda: list(token_budget_batches(OFFSETS, 128, 0, 0, rank=2, world=2)))


def test_batches_of_a_tokenized_corpus(tokenizer, corpus):
    tc = tokenize_corpus(tokenizer, corpus, 6, "none")
    batches = list(token_budget_batches(tc.offsets, 11, seed=0, epoch=0))
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert all(np.diff(tc.offsets)[b].sum() <= 11 for b in batches)


# --- causal shift -----------------------------------------------------------------------------------------------------

def test_shift_targets_the_next_token_and_masks_each_last_position():
    ids = np.array([5, 6, 7, 8, 9], dtype=np.uint16)
    inputs, targets = shift_for_causal_lm(ids)
    assert inputs.tolist() == [5, 6, 7, 8, 9] and targets.tolist() == [6, 7, 8, 9, IGNORE]
    _, targets = shift_for_causal_lm(ids, np.array([0, 2, 2, 5]))  # sequences [5 6], [], [7 8 9]
    assert targets.tolist() == [6, IGNORE, 8, 9, IGNORE] and targets.dtype == np.int64
