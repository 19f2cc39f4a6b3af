"""The dump's split LM head (teacher/lm_head.py): used only where head(body(x)) is the model's own logits, and the
stores it writes are byte for byte those of the whole forward, however the positions are cut into blocks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pkd_cache.testing import synthetic_rows, write_jsonl
from pkd_cache.testing.tamper import read_json

import pkd_cache
from pkd_cache.commands import dump_lm
from pkd_cache.teacher import lm_head


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_jsonl(folder / "train.jsonl", [{"text": s} for s, _ in synthetic_rows(40, 3)])
    return folder


def _probe(model):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def test_a_gpt2s_body_and_head_give_its_logits(lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm).eval()
    split = lm_head.split_head(model, _probe(model))
    assert split is not None and split.head is model.get_output_embeddings()
    x = _probe(model)
    with torch.no_grad():
        assert torch.equal(split.head(split.body(input_ids=x).last_hidden_state), model(input_ids=x).logits)


def test_a_model_that_changes_its_logits_after_the_head_runs_whole(lm):
    """Gemma-2 soft-caps its logits after the head; a GPT-2 whose forward rescales them is the same case."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=30.0)).eval()
    assert lm_head.split_head(gemma, _probe(gemma)) is None
    gemma.config.final_logit_softcapping = None  # the same model without the cap: its head gives its logits
    assert lm_head.split_head(gemma, _probe(gemma)) is not None

    model = AutoModelForCausalLM.from_pretrained(lm).eval()
    forward = model.forward

    def rescaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.0001
        return out

    model.forward = rescaled
    assert lm_head.split_head(model, _probe(model)) is None


def test_block_rows_bounds_the_logits_held_at_once():
    assert lm_head.block_rows(4096, torch.device("cpu")) == (1 << 22) // 4096
    assert lm_head.block_rows(128_256, torch.device("cpu")) == 32
    assert lm_head.block_rows(1 << 30, torch.device("cpu")) == 1


@pytest.mark.parametrize("settings", [
    dict(logits="sample:16"),
    dict(logits="sample:16", sequence_mode="cut", hidden_layers=[1], dtype="int8"),  # padded batches
    dict(logits="topk:4"),
], ids=["sample-packed", "sample-cut-padded", "topk"])
def test_the_split_head_writes_the_whole_forwards_bytes(lm, corpus, tmp_path, monkeypatch, settings):
    """The same store, chunk for chunk, from the whole forward and from the split head in blocks of 3 positions
    (blocks whose unique-id counts differ, merged into one batch)."""
    def dump(out):
        pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(lm), task="lm", data_files=[str(corpus / "train.jsonl")],
                                            out=str(out), max_seq_length=24, batch_size=4, chunk_tokens=64,
                                            **settings))
        return read_json(Path(out) / "checksums.json")["chunks"]

    from transformers import AutoConfig

    seen = []
    real = dump_lm.split_head
    monkeypatch.setattr(dump_lm, "split_head", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr(lm_head, "_BLOCK_CPU", 3 * AutoConfig.from_pretrained(lm).vocab_size)
    assert lm_head.block_rows(AutoConfig.from_pretrained(lm).vocab_size, torch.device("cpu")) == 3
    split = dump(tmp_path / "split.zarr")
    assert seen and seen[0] is not None
    monkeypatch.setattr(dump_lm, "split_head", lambda *a: None)
    assert dump(tmp_path / "whole.zarr") == split
