"""Loading task data from local files (GLUE TSV, Hugging Face exports, CSV, JSONL, Parquet), and its bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pkd_cache.data.loading import load_examples
from pkd_cache.data.tasks import get_task
from pkd_cache.errors import PkdCacheError
from pkd_cache.testing import GLUE, write_jsonl, write_tsv

SST2 = get_task("sst2")
RTE = get_task("rte")


def load(task, split, folder):
    return load_examples(get_task(task) if isinstance(task, str) else task, split, str(folder))


def error_of(task, split, folder) -> str:
    with pytest.raises(PkdCacheError) as info:
        load(task, split, folder)
    return str(info.value)


# --- layouts ---------------------------------------------------------------------------------------------------------

RTE_ROWS = [("A man sleeps.", "Someone sleeps.", "entailment"),
            ("It rains in Paris.", "Paris is dry.", "not_entailment"),
            ('He said "no".', "He agreed.", "not_entailment")]


def test_rte_original_layout_string_labels(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [(i, a, b, y) for i, (a, b, y) in enumerate(RTE_ROWS)],
        header=("index", "sentence1", "sentence2", "label"))
    ex = load("rte", "validation", tmp_path)
    assert ex.text_a == [r[0] for r in RTE_ROWS]
    assert ex.text_b == [r[1] for r in RTE_ROWS]  # the bare quotes of row 3 are kept (QUOTE_NONE)
    assert ex.labels.tolist() == [0, 1, 1] and ex.labels.dtype == np.int64
    assert ex.source == str(tmp_path / "dev.tsv")


def test_rte_hf_layout_int_labels(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [(a, b, RTE.label_names.index(y), i) for i, (a, b, y) in enumerate(RTE_ROWS)],
        header=("sentence1", "sentence2", "label", "idx"))
    ex = load("rte", "validation", tmp_path)
    assert ex.text_a == [r[0] for r in RTE_ROWS] and ex.text_b == [r[1] for r in RTE_ROWS]
    assert ex.labels.tolist() == [0, 1, 1]


def test_both_layouts_give_the_same_examples(tmp_path):
    write_tsv(tmp_path / "orig" / "dev.tsv", [(i, a, b, y) for i, (a, b, y) in enumerate(RTE_ROWS)],
        header=("index", "sentence1", "sentence2", "label"))
    write_tsv(tmp_path / "hf" / "dev.tsv",
              [(a, b, RTE.label_names.index(y), i) for i, (a, b, y) in enumerate(RTE_ROWS)],
        header=("sentence1", "sentence2", "label", "idx"))
    a, b = load("rte", "validation", tmp_path / "orig"), load("rte", "validation", tmp_path / "hf")
    assert (a.text_a, a.text_b, a.labels.tolist()) == (b.text_a, b.text_b, b.labels.tolist())
    assert a.fingerprint() == b.fingerprint()


def test_mrpc_original_layout_with_bom(tmp_path):
    rows = [(1, 11, 12, "The cat sat.", '"The cat sat," he said.'), (0, 21, 22, "Rain today.", "Sun tomorrow.")]
    write_tsv(tmp_path / "dev.tsv", rows, header=("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), bom=True)
    ex = load("mrpc", "validation", tmp_path)
    assert ex.text_a == ["The cat sat.", "Rain today."]
    assert ex.text_b == ['"The cat sat," he said.', "Sun tomorrow."]
    assert ex.labels.tolist() == [1, 0]


def test_mrpc_hf_layout(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("a b", "b a", 1, 0), ("c", "d", 0, 1)],
        header=("sentence1", "sentence2", "label", "idx"))
    ex = load("mrpc", "validation", tmp_path)
    assert ex.text_a == ["a b", "c"] and ex.text_b == ["b a", "d"] and ex.labels.tolist() == [1, 0]


def test_crlf_line_endings(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("good film", 1), ("bad film", 0)], header=("sentence", "label"), newline="\r\n")
    ex = load("sst2", "validation", tmp_path)
    assert ex.text_a == ["good film", "bad film"] and ex.labels.tolist() == [1, 0]


SST_ROWS = [("a good film ", 1), ("bad , really bad", 0), ('the "plot" , well', 1)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet", "tsv"])
def test_other_file_formats(tmp_path, fmt):
    path = tmp_path / f"dev.{fmt}"
    if fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            w.writerows(SST_ROWS)  # commas and quotes inside fields get quoted
    elif fmt in ("jsonl", "json"):
        write_jsonl(path, [{"sentence": s, "label": y} for s, y in SST_ROWS])
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"sentence": [s for s, _ in SST_ROWS], "label": [y for _, y in SST_ROWS]}), path)
    else:
        write_tsv(path, SST_ROWS, header=("sentence", "label"))
    ex = load("sst2", "validation", tmp_path)
    assert ex.text_a == [s for s, _ in SST_ROWS]
    assert ex.text_b is None
    assert ex.labels.tolist() == [1, 0, 1]
    assert ex.source == str(path)


def test_jsonl_label_names_and_hf_export_names(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl",
                [{"question": "q1", "sentence": "s1", "label": "not_entailment", "idx": 0},
                                          {"question": "q2", "sentence": "s2", "label": "entailment", "idx": 1}])
    ex = load("qnli", "validation", tmp_path)  # `validation` is the Hugging Face name of the dev split
    assert ex.text_a == ["q1", "q2"] and ex.text_b == ["s1", "s2"] and ex.labels.tolist() == [1, 0]


def test_parquet_pair_task_and_regression(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.25, 0.0],
                             "idx": [0, 1]}), tmp_path / "dev.parquet")
    ex = load("stsb", "validation", tmp_path)
    assert ex.text_b == ["c", "d"]
    assert ex.labels.dtype == np.float32 and ex.labels.tolist() == [4.25, 0.0]


def test_stsb_original_layout_score_column(tmp_path):
    header = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score")
    rows = [(0, "main-captions", "MSRvid", "2012test", 0, "none", "none", "A man.", "A guy.", "5.000"),
            (1, "main-news", "headlines", "2013", 3, "none", "none", "Up.", "Down.", "0.4")]
    write_tsv(tmp_path / "dev.tsv", rows, header=header)
    ex = load("stsb", "validation", tmp_path)
    assert ex.text_a == ["A man.", "Up."] and ex.text_b == ["A guy.", "Down."]
    assert ex.labels.tolist() == pytest.approx([5.0, 0.4])


def test_glue_root_with_task_subfolders(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [("fine", 1), ("dull", 0)], header=("sentence", "label"))
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [("great", 1)], header=("sentence", "label"))
    write_tsv(tmp_path / "RTE" / "dev.tsv", [(0, "a", "b", "entailment")],
        header=("index", "sentence1", "sentence2", "label"))
    assert load("sst2", "train", tmp_path).text_a == ["fine", "dull"]
    assert load("SST-2", "validation", tmp_path).text_a == ["great"]  # GLUE's own task name works too
    assert load("rte", "validation", tmp_path).labels.tolist() == [0]


def test_mnli_matched_and_mismatched_file_names(tmp_path):
    header = ("index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label")
    write_tsv(tmp_path / "dev_matched.tsv", [(0, 1, "1e", "fiction", "p m", "h m", "neutral", "neutral")],
              header=header)
    write_tsv(tmp_path / "dev_mismatched.tsv",
              [(0, 2, "2c", "letters", "p mm", "h mm", "contradiction", "contradiction"),
                                          (1, 3, "3e", "letters", "p2", "h2", "entailment", "entailment")],
        header=header)
    m = load("mnli", "validation_matched", tmp_path)
    mm = load("mnli", "validation_mismatched", tmp_path)
    assert (m.text_a, m.text_b, m.labels.tolist()) == (["p m"], ["h m"], [1])
    assert (mm.text_a, mm.labels.tolist()) == (["p mm", "p2"], [2, 0])
    with pytest.raises(PkdCacheError, match="has no split 'validation'"):
        load("mnli", "validation", tmp_path)


def test_mnli_hf_export_names(tmp_path):
    write_jsonl(tmp_path / "validation_mismatched.jsonl", [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}])
    ex = load("mnli", "validation_mismatched", tmp_path)
    assert (ex.text_a, ex.text_b, ex.labels.tolist()) == (["p"], ["h"], [2])


def test_cola_headerless_original_layout(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("gj04", 1, "", "Our friends won't buy this analysis."),
                               ("gj04", 0, "*", "They drank the pub.")])
    ex = load("cola", "validation", tmp_path)
    assert ex.text_a == ["Our friends won't buy this analysis.", "They drank the pub."]
    assert ex.labels.tolist() == [1, 0]


def test_cola_hf_layout_with_header(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("A fine sentence.", 1, 0)], header=("sentence", "label", "idx"))
    assert load("cola", "validation", tmp_path).text_a == ["A fine sentence."]


def test_max_examples_takes_the_head(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [(f"s{i}", i % 2) for i in range(10)], header=("sentence", "label"))
    ex = load_examples(SST2, "validation", str(tmp_path), max_examples=3)
    assert ex.text_a == ["s0", "s1", "s2"] and ex.labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize("n", [0, -3])
def test_max_examples_must_be_positive(tmp_path, n):
    write_tsv(tmp_path / "dev.tsv", [(f"s{i}", i % 2) for i in range(10)], header=("sentence", "label"))
    with pytest.raises(PkdCacheError, match=f"must be > 0, got {n}"):  # not rows[:-3], 7 of the 10 examples
        load_examples(SST2, "validation", str(tmp_path), max_examples=n)


# --- the real GLUE files ---------------------------------------------------------------------------------------------

def glue_file(folder: str, name: str = "dev.tsv"):
    path = GLUE / folder / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def test_real_sst2_dev():
    glue_file("SST-2")
    ex = load("sst2", "validation", GLUE / "SST-2")
    assert len(ex) == 872 and ex.text_b is None
    assert set(ex.labels.tolist()) == {0, 1}
    assert ex.text_a[0].startswith("it 's a charming and often affecting journey")


def test_real_glue_root():
    glue_file("SST-2")
    assert len(load("sst2", "validation", GLUE)) == 872  # data_dir = the GLUE root, found via SST-2/


def test_real_rte_dev_hf_layout():
    glue_file("RTE")
    ex = load("rte", "validation", GLUE / "RTE")
    assert len(ex) == 277 and len(ex.text_b) == 277
    assert set(ex.labels.tolist()) == {0, 1}
    assert ex.text_b[0] == "Christopher Reeve had an accident." and ex.labels[0] == 1


def test_real_mrpc_dev_with_bom():
    path = glue_file("MRPC")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # the file really has a BOM
    ex = load("mrpc", "validation", GLUE / "MRPC")
    assert len(ex) == 408
    assert not ex.text_a[0].startswith("\ufeff")
    assert ex.text_a[0].startswith("He said the foodservice pie business")
    assert ex.text_b[0].startswith('"The foodservice pie business')  # a bare quote, kept as is
    assert ex.labels[0] == 1 and set(ex.labels.tolist()) == {0, 1}


def test_real_qnli_dev_string_labels():
    path = glue_file("QNLI")
    ex = load("qnli", "validation", GLUE / "QNLI")
    assert len(ex) == 5463
    names = [line.rsplit("\t", 1)[1] for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    assert ex.labels.tolist() == [0 if n == "entailment" else 1 for n in names]
    assert set(ex.labels.tolist()) == {0, 1}


# --- bad input -------------------------------------------------------------------------------------------------------

def test_ragged_tsv_row_names_the_line(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("fine", 1), ("a\tstray tab", 0), ("ok", 1)], header=("sentence", "label"))
    msg = error_of("sst2", "validation", tmp_path)
    assert "line 3" in msg and "3 fields" in msg and "header has 2" in msg and str(tmp_path / "dev.tsv") in msg


def test_ragged_row_after_a_blank_line_names_the_file_line(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n\nok\t1\nbad\ttab\t0\n")
    msg = error_of("sst2", "validation", tmp_path)
    assert "line 5:" in msg


def test_ragged_csv_row_after_multiline_field_names_the_file_line(tmp_path):
    (tmp_path / "dev.csv").write_text('sentence,label\n"two\nlines",1\nfine,1,extra\n')
    msg = error_of("sst2", "validation", tmp_path)
    assert "line 4:" in msg


def test_missing_column(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("fine", 1)], header=("text", "label"))
    msg = error_of("sst2", "validation", tmp_path)
    assert "no text column" in msg and "sentence" in msg and "found: text, label" in msg


def test_misnamed_second_text_column(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("a", "b", 0)], header=("sentence1", "sentence_2", "label"))
    msg = error_of("rte", "validation", tmp_path)
    assert "no second text column" in msg and "sentence2" in msg


def test_missing_label_column(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "a", "labels": 1}])
    msg = error_of("sst2", "validation", tmp_path)
    assert "no label column" in msg and "labels" in msg


def test_column_missing_in_a_later_jsonl_row(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl",
                [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 0}, {"sentence": "c"}])
    msg = error_of("sst2", "validation", tmp_path)
    assert "example 2" in msg and "label" in msg


@pytest.mark.parametrize("row", [{"sentence": None, "label": 1}, {"sentence": "b", "label": None}])
def test_null_text_or_label(tmp_path, row):
    write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "a", "label": 0}, row])
    msg = error_of("sst2", "validation", tmp_path)
    assert "example 1" in msg and "no value" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    (tmp_path / "dev.json").write_text(json.dumps([{"sentence": "a", "label": 1}]) + "\n")
    msg = error_of("sst2", "validation", tmp_path)
    assert "line 1" in msg and "JSON object" in msg


def test_jsonl_with_bom(tmp_path):
    (tmp_path / "dev.jsonl").write_text("\ufeff" + json.dumps({"sentence": "a", "label": 1}) + "\n", encoding="utf-8")
    ex = load("sst2", "validation", tmp_path)
    assert ex.text_a == ["a"] and ex.labels.tolist() == [1]


@pytest.mark.parametrize("label", ["2", "-1", 5, 1.5, True])
def test_label_outside_the_label_set(tmp_path, label):
    write_jsonl(tmp_path / "dev.jsonl", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": label}])
    msg = error_of("sst2", "validation", tmp_path)
    assert "example 1" in msg and "label" in msg and "0..1" in msg


def test_label_outside_the_label_set_tsv(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [(0, "a", "b", "entailment"), (1, "c", "d", "2")],
        header=("index", "sentence1", "sentence2", "label"))
    msg = error_of("rte", "validation", tmp_path)
    assert "example 1: label 2 is outside" in msg and "entailment, not_entailment" in msg


@pytest.mark.parametrize("task,label", [("sst2", "pos"), ("rte", "neutral"), ("mnli", "Entailment!")])
def test_text_label_that_is_not_a_label_name(tmp_path, task, label):
    t = get_task(task)
    cols = (t.text_a[0],) + ((t.text_b[0],) if t.text_b else ()) + ("label",)
    row = ("x",) * (len(cols) - 1) + (label,)
    name = "dev_matched.tsv" if task == "mnli" else "dev.tsv"
    write_tsv(tmp_path / name, [row], header=cols)
    msg = error_of(task, t.dev_splits[0], tmp_path)
    assert repr(label) in msg and "label set" in msg
    assert all(n in msg for n in t.label_names)


def test_regression_label_not_a_number(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("a", "b", "high")], header=("sentence1", "sentence2", "score"))
    assert "not a number" in error_of("stsb", "validation", tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n", "\ufeff"])
def test_empty_tsv(tmp_path, content):
    (tmp_path / "dev.tsv").write_text(content, encoding="utf-8")
    assert "empty" in error_of("sst2", "validation", tmp_path)


def test_header_only(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [], header=("sentence", "label"))
    assert "no examples" in error_of("sst2", "validation", tmp_path)


def test_empty_jsonl(tmp_path):
    (tmp_path / "dev.jsonl").write_text("")
    assert "no examples" in error_of("sst2", "validation", tmp_path)


def test_broken_jsonl_line(tmp_path):
    (tmp_path / "dev.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label":\n')
    msg = error_of("sst2", "validation", tmp_path)
    assert "line 2" in msg and "not valid JSON" in msg


def test_broken_parquet(tmp_path):
    (tmp_path / "dev.parquet").write_bytes(b"not parquet at all")
    assert "cannot read" in error_of("sst2", "validation", tmp_path)


def test_not_utf8(tmp_path):
    (tmp_path / "dev.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    assert "cannot read" in error_of("sst2", "validation", tmp_path)


@pytest.mark.parametrize("name", ["sst-3", "", "glue"])
def test_unknown_task(name):
    with pytest.raises(PkdCacheError, match="unknown task") as info:
        get_task(name)
    assert "sst2" in str(info.value) and "mnli" in str(info.value)


@pytest.mark.parametrize("name,expected", [("SST-2", "sst2"), (" sst2 ", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"),
                                           ("MNLI", "mnli"), ("mnli-m", "mnli")])
def test_task_aliases(name, expected):
    assert get_task(name).name == expected


def test_missing_split_file(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 1)], header=("sentence", "label"))
    msg = error_of("sst2", "validation", tmp_path)
    assert "no file for split 'validation'" in msg and "dev.tsv" in msg and str(tmp_path) in msg


def test_unknown_split(tmp_path):
    write_tsv(tmp_path / "dev.tsv", [("a", 1)], header=("sentence", "label"))
    assert "has no split 'test'" in error_of("sst2", "test", tmp_path)


def test_data_dir_not_a_directory(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [("a", 1)], header=("sentence", "label"))
    assert "is not a directory" in error_of("sst2", "validation", path)
    assert "is not a directory" in error_of("sst2", "validation", tmp_path / "missing")
