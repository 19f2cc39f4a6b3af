"""`pkd-cache eval --task lm`: a causal LM's perplexity on a held-out corpus, equal to Hugging Face's own next-token
loss on the same packed sequences; bad input is one line."""
from __future__ import annotations

import json
import math

import pytest
import torch
from pkd_cache.testing import cli_in_process, make_bert, show, synthetic_rows, write_jsonl

import pkd_cache
from pkd_cache.data.corpus import load_corpus, tokenize_corpus


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    rows = [{"text": s} for s, _ in synthetic_rows(40, 7)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "heldout.jsonl", rows)


def test_perplexity_is_the_models_own_next_token_loss(lm, heldout):
    """Packed into sequences of 16 (the last shorter): exp of the token-weighted mean of HF's `labels=` loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = cli_in_process("eval", "--model", lm, "--task", "lm", "--data-files", heldout, "--max-seq-length", "16",
                       "--json")
    assert p.returncode == 0, show(p)
    got = json.loads(p.stdout)
    assert "packed into sequences of 16 tokens" in " ".join(p.stderr.split()), show(p)

    model, tok = AutoModelForCausalLM.from_pretrained(lm).eval(), AutoTokenizer.from_pretrained(lm)
    seqs = tokenize_corpus(tok, load_corpus([str(heldout)]), 16, "pack")
    nll, count = 0.0, 0
    with torch.no_grad():
        for a, b in zip(seqs.offsets[:-1], seqs.offsets[1:]):
            ids = torch.from_numpy(seqs.input_ids[a:b].astype("int64"))[None]
            nll += float(model(input_ids=ids, labels=ids).loss) * (b - a - 1)  # HF shifts: b - a - 1 scored
            count += int(b - a - 1)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the Python API is the same call
    api = pkd_cache.evaluate(pkd_cache.EvalConfig(model=str(lm), task="lm", data_files=[str(heldout)],
                                                  max_seq_length=16))
    assert api["perplexity"] == pytest.approx(got["perplexity"], rel=1e-6)


def test_the_table_names_the_scores(lm, heldout):
    p = cli_in_process("eval", "--model", lm, "--task", "lm", "--data_files", heldout)
    assert p.returncode == 0 and "perplexity" in p.stdout and "tokens" in p.stdout, show(p)


@pytest.mark.parametrize("what", ["no data files", "data files for glue", "not a causal lm", "empty corpus"])
def test_bad_input_is_one_line(lm, heldout, tmp_path, what):
    args = {"no data files": ["--model", lm, "--task", "lm"],
            "data files for glue": ["--model", lm, "--task", "sst2", "--data-files", heldout],
            "not a causal lm": ["--model", make_bert(tmp_path / "bert"), "--task", "lm", "--data-files", heldout],
            "empty corpus": ["--model", lm, "--task", "lm", "--data-files", write_jsonl(tmp_path / "e.jsonl", [])],
            }[what]
    says = {"no data files": "eval --task lm scores perplexity on a held-out corpus: pass --data-files FILE",
            "data files for glue": "--data-files is for --task lm; sst2 reads its dev split from --data-dir",
            "not a causal lm": "causal", "empty corpus": "empty"}[what]
    p = cli_in_process("eval", *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], show(p)
