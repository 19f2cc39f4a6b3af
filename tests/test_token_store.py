"""Token stores (`dump --task lm`, docs/FORMAT.md version 2): what the store holds is what the teacher gave, token for
token; resume is byte-identical; verify and distill check every row; the cache key has the logit spec and seed;
bad input is one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pkd_cache.testing import cli_in_process, make_bert, make_causal_lm, show, synthetic_rows, write_jsonl
from pkd_cache.testing.tamper import read_json, rewrite_chunk

import pkd_cache
from pkd_cache.data.corpus import load_corpus, tokenize_corpus
from pkd_cache.store.reader import open_store
from pkd_cache.store.token_stream import iter_token_batches, sequence_offsets, token_plan
from pkd_cache.teacher.token_targets import seeded_sample_targets

C = 64  # tokens per row: small, so a sequence runs across rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_jsonl(folder / "train.jsonl", [{"text": s} for s, _ in synthetic_rows(60, 1)])
    write_jsonl(folder / "heldout.jsonl", [{"text": s} for s, _ in synthetic_rows(12, 2)])
    return folder


def _dump(lm, corpus, out, **settings):
    base = dict(teacher=str(lm), task="lm", data_files=[str(corpus / "train.jsonl")],
                validation_files=[str(corpus / "heldout.jsonl")], out=out and str(out), max_seq_length=24, batch_size=4,
                chunk_tokens=C, logits="sample:16", hidden_layers=[0, 2], dtype="float16")
    return pkd_cache.dump(pkd_cache.DumpConfig(**{**base, **settings}))


@pytest.fixture(scope="module")
def store(lm, corpus, tmp_path_factory):
    return _dump(lm, corpus, tmp_path_factory.mktemp("stores") / "lm.zarr")


def _tokens(lm, corpus, name="train.jsonl"):
    from transformers import AutoTokenizer

    return tokenize_corpus(AutoTokenizer.from_pretrained(lm), load_corpus([str(corpus / name)]), 24, "pack")


def test_the_store_holds_the_teachers_outputs_for_every_token(lm, corpus, store):
    """Unshuffled batches of one sequence give back the corpus's tokens, the seeded draws of the teacher's own
    logits at each token's corpus index, and its hidden states (float16) of the layers asked for."""
    from transformers import AutoModelForCausalLM

    tok = _tokens(lm, corpus)
    assert store.meta.layout == "tokens" and store.info()["format_version"] == 2
    assert store.info()["splits"]["train"]["num_tokens"] == tok.num_tokens
    assert store.num_examples("train") == -(-tok.num_tokens // C) > 2
    assert (sequence_offsets(store, "train") == tok.offsets).all()
    model = AutoModelForCausalLM.from_pretrained(lm).eval()
    batches = list(iter_token_batches(store, "train", 24, shuffle=False, hidden=True))
    assert len(batches) == tok.num_sequences
    for i in (0, 1, len(batches) - 1):  # the last sequence is shorter than 24
        b = batches[i]
        a, e = tok.offsets[i], tok.offsets[i + 1]
        assert b["input_ids"].shape == (1, e - a)
        assert (b["input_ids"][0].numpy() == tok.input_ids[a:e]).all()
        with torch.no_grad():
            out = model(torch.from_numpy(tok.input_ids[a:e].astype(np.int64))[None], output_hidden_states=True)
        ids, counts = seeded_sample_targets(out.logits[0], 16, 0, int(a))
        m = b["target_ids"].shape[-1]
        assert (b["target_ids"].dtype, b["target_counts"].dtype) == (torch.int32, torch.int16)  # a third of int64's
        assert torch.equal(b["target_ids"][0, :, :ids.shape[1]], ids) and torch.equal(
            b["target_counts"][0, :, :ids.shape[1]], counts)
        assert (b["target_counts"][0, :, ids.shape[1]:m] == 0).all()
        for pos, layer in enumerate((0, 2)):
            want = out.hidden_states[layer][0].half().float()
            assert torch.allclose(b["hidden"][0, :, pos], want, atol=1e-3), layer


def test_shuffled_batches_cover_every_sequence_once_within_the_budget(store):
    offsets = sequence_offsets(store, "train")
    plan = token_plan(offsets, C, 60, True, 3, 1)
    seen = np.concatenate(plan)
    assert sorted(seen.tolist()) == list(range(len(offsets) - 1))
    assert all(np.diff(offsets)[b].sum() <= 60 for b in plan)
    assert [b.tolist() for b in plan] == [b.tolist() for b in token_plan(offsets, C, 60, True, 3, 1)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in token_plan(offsets, C, 60, True, 3, 2)]
    ranks = [token_plan(offsets, C, 60, True, 3, 1, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not set(np.concatenate(ranks[0])) & set(np.concatenate(ranks[1]))
    resumed = list(iter_token_batches(store, "train", 60, seed=3, epoch=1, start_batch=2))
    whole = list(iter_token_batches(store, "train", 60, seed=3, epoch=1))
    assert len(resumed) == len(whole) - 2 and all(torch.equal(x["input_ids"], y["input_ids"])
                                                  for x, y in zip(resumed, whole[2:]))


@pytest.mark.parametrize("workers, prefetch", [(3, 2), (1, 0), (2, 1)])
def test_rows_decoded_on_a_pool_give_the_same_batches(store, workers, prefetch):
    """Rows decoded ahead on `workers` threads give, batch for batch, what decoding each row when it is first needed
    on the gathering thread gives (workers 0), resumed part-way too; with budgets that cut sequences across rows."""
    for budget, start in ((60, 0), (200, 3)):
        kw = dict(seed=5, epoch=1, shuffle_chunks=2, start_batch=start, hidden=True)
        plain = [{k: v.numpy() for k, v in b.items()}
                 for b in iter_token_batches(store, "train", budget, workers=0, prefetch=0, **kw)]
        pooled = [{k: v.numpy() for k, v in b.items()}
                  for b in iter_token_batches(store, "train", budget, workers=workers, prefetch=prefetch, **kw)]
        _same_batches(plain, pooled)


def test_verify_passes_and_the_metadata_records_the_spec(store):
    p = cli_in_process("verify", store.path)
    assert p.returncode == 0, show(p)
    lm = store.meta.lm
    assert lm["targets"] == {"kind": "sample", "count": 16, "seed": 0, "temperature": 1.0}
    assert lm["hidden_layers"] == [0, 2] and lm["id_dtype"] == "uint8"
    parts = store.info()["cache_key_parts"]["settings"]
    assert parts["logits"] == "sample:16" and parts["sample_seed"] == 0


def test_topk_rows_round_trip(lm, corpus, tmp_path):
    """topk:4: the 4 largest log-probs of the teacher at each position, ids and values (float16)."""
    from transformers import AutoModelForCausalLM

    s = _dump(lm, corpus, tmp_path / "top.zarr", logits="topk:4", hidden_layers=None)
    tok = _tokens(lm, corpus)
    b = next(iter_token_batches(s, "train", 24, shuffle=False))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(lm).eval()(
            torch.from_numpy(tok.input_ids[:24].astype(np.int64))[None]).logits[0]
    lp = torch.log_softmax(logits, -1)
    want = lp.topk(4, -1).indices.sort(-1).values
    assert torch.equal(b["target_ids"][0], want)
    assert torch.allclose(b["target_logprobs"][0], lp.gather(-1, want), atol=2e-3)
    assert "hidden" not in b and cli_in_process("verify", s.path).returncode == 0


def test_resume_is_byte_identical(lm, corpus, store, tmp_path, monkeypatch):
    """A dump stopped after 2 rows, resumed with the same command: every chunk file equals the uninterrupted one's."""
    from pkd_cache.store.backends import zarr_backend

    out = tmp_path / "resumed.zarr"
    real, written = zarr_backend.StoreWriter.write, []

    def stop_after_two(self, split, start, arrays):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(start)
        real(self, split, start, arrays)

    monkeypatch.setattr(zarr_backend.StoreWriter, "write", stop_after_two)
    with pytest.raises(pkd_cache.PkdCacheError, match="--resume"):
        _dump(lm, corpus, out)
    monkeypatch.setattr(zarr_backend.StoreWriter, "write", real)
    _dump(lm, corpus, out, resume=True)
    want = read_json(Path(store.path) / "checksums.json")
    assert read_json(out / "checksums.json")["chunks"] == want["chunks"]
    assert open_store(str(out)).info()["resumptions"]


def test_the_seed_and_spec_are_in_the_cache_key(lm, corpus, store, tmp_path):
    again = _dump(lm, corpus, store.path)  # the same dump: a hit, nothing rewritten
    assert again.info()["cache_key"] == store.info()["cache_key"]
    with pytest.raises(pkd_cache.PkdCacheError, match="sample_seed 0 -> 1"):
        _dump(lm, corpus, store.path, sample_seed=1)
    with pytest.raises(pkd_cache.PkdCacheError, match="logits 'sample:16' -> 'topk:16'"):
        _dump(lm, corpus, store.path, logits="topk:16")


def test_a_tampered_target_row_is_refused_by_verify_and_distill(store, tmp_path):
    """Row 1's coded sizes changed (its checksum recomputed, as a tamperer who knows the format would)."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store.path, bad)
    sizes = open_store(str(bad)).array("train", "target_bytes").chunk(1).copy()
    sizes[0, 1] -= 1
    rewrite_chunk(bad, "train/target_bytes/c/1/0", sizes)
    p = cli_in_process("verify", bad)
    assert p.returncode != 0 and "targets row 1" in p.stdout + p.stderr, show(p)
    p = cli_in_process("distill", "--store", bad, "--output-dir", tmp_path / "s", "--student-layers", "1",
                       "--max-steps", "40", "--batch-size", "2")
    assert p.returncode != 0 and "targets row 1" in p.stderr and "Traceback" not in p.stderr, show(p)


def test_distill_trains_a_causal_lm_student_from_the_store(store, corpus, tmp_path):
    out = tmp_path / "student"
    p = cli_in_process("distill", "--store", store.path, "--output-dir", out, "--student-layers", "1",
                       "--epochs", "1", "--batch-size", "2", "--beta", "1", "--learning-rate", "1e-3")
    assert p.returncode == 0, show(p)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["logits"] == "sample:16" and metrics["hidden_layer_map"] == {"1": 2}
    first, last = metrics["history"][0]["eval_loss"], metrics["best_eval_loss"]
    assert np.isfinite(last) and last <= first
    p = cli_in_process("eval", "--model", out, "--task", "lm", "--data-files", corpus / "heldout.jsonl", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["perplexity"] > 1, show(p)


@pytest.mark.parametrize("args, words", [
    (["--logits", "topk:0"], "K must be in [1,"),
    (["--logits", "sample:100000"], "N must be in [1,"),
    (["--logits", "top:3"], "is not one of sample:N, topk:K or none"),
    (["--hidden-layers", "3"], "--hidden-layers 3 is out of range: the teacher has 2 layers"),
    (["--sequence-mode", "none", "--max-seq-length", "4"], "cutting is off"),
])
def test_bad_dump_input_is_one_line(lm, corpus, tmp_path, args, words):
    p = cli_in_process("dump", "--teacher", lm, "--task", "lm", "--data-files", corpus / "train.jsonl",
                       "--out", tmp_path / "x.zarr", "--logits", "sample:16", *args)
    assert p.returncode != 0 and words in p.stderr and "Traceback" not in p.stderr, show(p)
    assert not (tmp_path / "x.zarr").exists()


def test_bad_teacher_corpus_and_student_are_one_line(lm, corpus, store, tmp_path):
    bert = make_bert(tmp_path / "bert")
    p = cli_in_process("dump", "--teacher", bert, "--task", "lm", "--data-files", corpus / "train.jsonl",
                       "--out", tmp_path / "x.zarr")
    assert p.returncode != 0 and "not a causal LM" in p.stderr, show(p)
    (tmp_path / "empty.txt").write_text("\n\n")
    p = cli_in_process("dump", "--teacher", lm, "--task", "lm", "--data-files", tmp_path / "empty.txt",
                       "--out", tmp_path / "x.zarr")
    assert p.returncode != 0 and "the corpus is empty" in p.stderr, show(p)
    other = make_causal_lm(tmp_path / "other", layers=1, hidden=16)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 5
    (other / "config.json").write_text(json.dumps(config))
    shutil.rmtree(other / "model.safetensors", ignore_errors=True)
    (other / "model.safetensors").unlink(missing_ok=True)
    torch.manual_seed(0)
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    p = cli_in_process("distill", "--store", store.path, "--student-init", other, "--student-layers", "1",
                       "--output-dir", tmp_path / "s")
    assert p.returncode != 0 and "vocabulary" in p.stderr and "Traceback" not in p.stderr, show(p)
    p = cli_in_process("distill", "--store", store.path, "--student-layers", "1", "--output-dir", tmp_path / "s",
                       "--temperature", "2")
    assert p.returncode != 0 and "drawn at temperature 1" in p.stderr, show(p)


def test_sentence_level_batches_of_a_token_store_are_refused(store):
    with pytest.raises(pkd_cache.PkdCacheError, match="token store"):
        next(iter(store.batches("train", 4)))


def _every_batch(store):
    return [{k: v.numpy() for k, v in b.items()} for b in iter_token_batches(store, "train", 60, seed=5, hidden=True)]


def _same_batches(a, b):
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and {"input_ids", "target_ids", "target_counts", "hidden"} <= x.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _get(url, token):
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})) as r:
        return r.read().decode()


def test_a_token_store_on_a_url_and_behind_serve_reads_like_the_local_one(lm, corpus, store, tmp_path, monkeypatch):
    """Remote stores hold for token stores: a dump to an fsspec URL is the same store (key and batches), verify
    checks it there; `pkd-cache serve` lists and shows it in tokens (not labels, which it has none of) and a student
    distils from it through the server."""
    import threading

    from pkd_cache.commands.serve import make_server

    url = "memory://pkd-tests/lm.zarr"
    remote = _dump(lm, corpus, url)
    assert remote.info()["cache_key"] == store.info()["cache_key"]
    _same_batches(_every_batch(remote), _every_batch(store))
    p = cli_in_process("verify", url)
    assert p.returncode == 0 and p.stdout.startswith("ok:"), show(p)

    server = make_server(str(Path(store.path).parent), port=0, token="t0ken", quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PKD_CACHE_TOKEN", "t0ken")
    try:
        served = f"{server.url}/{Path(store.path).name}"
        _same_batches(_every_batch(open_store(served)), _every_batch(store))
        p = cli_in_process("verify", served)
        assert p.returncode == 0 and p.stdout.startswith("ok:"), show(p)
        tokens = store.info()["splits"]["train"]["num_tokens"]
        listed = json.loads(_get(f"{server.url}/?format=json", "t0ken"))["stores"]
        assert [(s["splits"]["train"], s["per_token"]) for s in listed] == [(tokens, "sample:16, hidden float16")]
        page = _get(f"{server.url}/-/{Path(store.path).name}", "t0ken")
        assert "<th>sequences</th>" in page and f"<td>{tokens:,}</td>" in page and "--student-layers 1" in page
        p = cli_in_process("ls", server.url)
        assert p.returncode == 0 and f"train {tokens:,} tokens" in p.stdout and "sample:16" in p.stdout, show(p)
        out = tmp_path / "student"
        p = cli_in_process("distill", "--store", served, "--output-dir", out, "--student-layers", "1",
                           "--max-steps", "3", "--batch-size", "2")
        assert p.returncode == 0 and (out / "model.safetensors").is_file(), show(p)
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_store_lives_in_the_team_cache_and_is_found_by_id(lm, corpus, store, tmp_path, monkeypatch):
    """No --out: the store goes to its place in the cache (`lm/<teacher>-<id>.zarr`), the same dump is a hit there,
    and its id names it for info, verify and distill."""
    cache = tmp_path / "cache"
    first = _dump(lm, corpus, None, cache=str(cache))
    ident = first.info()["cache_key"][:12]
    assert first.info()["cache_key"] == store.info()["cache_key"]
    assert Path(first.path) == cache / "lm" / f"{lm.name}-{ident}.zarr"
    assert _dump(lm, corpus, None, cache=str(cache)).path == first.path
    monkeypatch.setenv("PKD_CACHE", str(cache))
    p = cli_in_process("info", ident[:6])
    assert p.returncode == 0 and "sample:16 (seed 0" in p.stdout and "next-token targets of a causal LM" in p.stdout, \
        show(p)
    assert "pkd-cache v2, zarr" in " ".join(p.stdout.split()), show(p)  # the format and its backend
    p = cli_in_process("verify", ident)
    assert p.returncode == 0 and p.stdout.startswith(f"ok: {first.path}"), show(p)
    p = cli_in_process("distill", "--store", ident, "--output-dir", tmp_path / "student", "--student-layers", "1",
                       "--max-steps", "2", "--batch-size", "2")
    assert p.returncode == 0, show(p)


@pytest.fixture(scope="module")
def encoder_store(corpus, tmp_path_factory):
    """A token store of a BERT (no LM head): `--logits none`, the hidden states of every layer, in float16."""
    bert = make_bert(tmp_path_factory.mktemp("bert") / "bert", layers=2, hidden=32, head=False)
    return bert, _dump(bert, corpus, tmp_path_factory.mktemp("enc") / "enc.zarr", logits="none",
                       hidden_layers=[0, 1, 2])


def test_an_encoder_store_holds_the_encoders_hidden_states(encoder_store):
    """Every real token's stored states are the encoder's own, on the sequences as the reader gives them back."""
    from transformers import AutoModel

    bert, store = encoder_store
    assert store.meta.lm["targets"] == {"kind": "none"} and store.meta.lm["hidden_layers"] == [0, 1, 2]
    assert store.meta.lm["teacher_kind"] == "encoder" and "whole sequence" in store.meta.lm["alignment"]
    p = cli_in_process("info", store.path)  # not "next-token targets": an encoder's states are not causal
    assert p.returncode == 0 and "an encoder's hidden states, per token" in " ".join(p.stdout.split()), show(p)
    batch = next(iter_token_batches(store, "train", 10 ** 6, shuffle=False, hidden=True))
    assert int(batch["attention_mask"].sum()) == store.info()["splits"]["train"]["num_tokens"]  # one batch: all
    with torch.no_grad():
        out = AutoModel.from_pretrained(bert).eval()(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    for p, layer in enumerate([0, 1, 2]):
        want = out.hidden_states[layer][real]
        np.testing.assert_allclose(batch["hidden"][:, :, p][real].numpy(), want.numpy(), rtol=2e-3, atol=2e-3)


def test_an_encoder_student_learns_the_stored_hidden_states(encoder_store, corpus, tmp_path):
    """TinyBERT-style: a 1-layer BERT from the encoder's first layer, trained on hidden-state MSE alone; its
    validation MSE falls, and it saves as a BERT that a task can start from."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    bert, store = encoder_store
    out = tmp_path / "student"
    p = cli_in_process("distill", "--store", store.path, "--output-dir", out, "--student-layers", "1", "--beta", "1",
                       "--epochs", "3", "--batch-size", "2", "--learning-rate", "3e-3")
    assert p.returncode == 0 and "1-layer encoder student" in p.stderr, show(p)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["student"] == "encoder" and metrics["hidden_layer_map"] == {"1": 2} and metrics["alpha"] == 0
    first, best = metrics["history"][0]["eval_loss"], metrics["best_eval_loss"]
    assert np.isfinite(best) and best < first
    assert AutoModel.from_pretrained(out).config.num_hidden_layers == 1
    assert AutoModelForSequenceClassification.from_pretrained(out, num_labels=2).config.num_hidden_layers == 1

    p = cli_in_process("distill", "--store", store.path, "--output-dir", tmp_path / "s2", "--student-layers", "1")
    assert p.returncode != 0 and "is an encoder: it learns from the store's hidden states alone; pass --beta" \
        in p.stderr and "Traceback" not in p.stderr, show(p)
    assert not (tmp_path / "s2").exists()


def test_gradient_accumulation_and_fp16_for_a_causal_lm_student(store, tmp_path, monkeypatch):
    """--gradient-accumulation-steps G: a step takes G forwards of --max-tokens (half the steps for G = 2; that G
    steps equal G ranks is tests/test_distributed.py's). --fp16 runs float16 autocast with a GradScaler (on CPU
    through the tests' device seam, as test_trainer_flags does) and lands near the float32 student."""
    from safetensors.torch import load_file

    from pkd_cache.commands import distill as distill_module
    from pkd_cache.store.token_stream import steps_per_epoch

    monkeypatch.setattr(distill_module, "FP16_DEVICES", ("cuda", "cpu"))
    common = ["--store", store.path, "--student-layers", "1", "--epochs", "1", "--max-tokens", "48",
              "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--logging-steps", "1"]
    runs = {}
    for name, extra in (("fp32", []), ("fp16", ["--fp16"])):
        p = cli_in_process("distill", *common, *extra, "--output-dir", tmp_path / name)
        assert p.returncode == 0 and "2 per optimizer step" in p.stderr, show(p)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["steps"] == steps_per_epoch(store, "train", 48, 1) // 2 > 1
        assert metrics["gradient_accumulation_steps"] == 2 and np.isfinite(metrics["best_eval_loss"])
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    diff = max(float((runs["fp16"][k].float() - runs["fp32"][k]).abs().max()) for k in runs["fp32"])
    assert 0 < diff < 0.05, diff
    p = cli_in_process("distill", *common[:-4], "--gradient-accumulation-steps", "1000", "--output-dir",
                       tmp_path / "many")
    assert p.returncode != 0 and "has fewer batches of 48 tokens per rank than that" in p.stderr, show(p)
    assert not (tmp_path / "many").exists()


def test_an_arrow_token_store_holds_what_the_zarr_one_does(lm, corpus, store, tmp_path):
    """`--format arrow`: the same rows as Arrow IPC shards (one per row of C tokens, a column per hidden layer): the
    same batches, verify checks every shard, and a student distils from it."""
    arrow = _dump(lm, corpus, tmp_path / "lm.arrow", format="arrow")
    assert (Path(arrow.path) / "train" / "00000.arrow").is_file() and arrow.info()["layout"] == "tokens"
    assert arrow.info()["completed_at"] >= arrow.info()["created_at"]
    _same_batches(_every_batch(arrow), _every_batch(store))
    p = cli_in_process("verify", arrow.path)
    assert p.returncode == 0 and p.stdout.startswith("ok:"), show(p)
    p = cli_in_process("distill", "--store", arrow.path, "--output-dir", tmp_path / "student", "--student-layers", "1",
                       "--max-steps", "3", "--batch-size", "2", "--beta", "1")
    assert p.returncode == 0, show(p)


def test_a_sweep_over_a_token_store_ranks_by_the_lowest_loss(store, tmp_path):
    """`sweep` trains a grid of causal-LM students from a token store, checks every run against the store before
    any trains, and ranks them by eval_loss, lowest first (the sentence-level sweep ranks accuracy, highest first)."""
    import csv

    args = ["--store", store.path, "--student-layers", "1", "--max-steps", "3", "--batch-size", "2"]
    p = cli_in_process("sweep", *args, "--grid", "alpha=0,0.5", "--grid", "temperature=1,2", "--output-dir",
                       tmp_path / "bad")
    assert p.returncode != 0 and "--temperature 2: the store's targets were drawn at temperature 1" in p.stderr, show(p)
    assert not (tmp_path / "bad").exists()
    p = cli_in_process("sweep", *args, "--grid", "alpha=0,0.5,1", "--output-dir", tmp_path / "runs")
    assert p.returncode == 0, show(p)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "results.csv")))
    assert len(rows) == 3 and {r["metric"] for r in rows} == {"eval_loss"}
    best = min(rows, key=lambda r: float(r["best"]))["run"]
    ranked = [line.split("│")[2].strip() for line in p.stdout.splitlines() if line.startswith("│")]
    assert ranked[0] == best and len(ranked) == 3, p.stdout
    assert (tmp_path / "runs" / "sweep.png").stat().st_size > 0


def test_the_issues_dump_command_line_runs_as_written(lm, corpus, tmp_path):
    """`dump --task lm ... --logits sample:N --hidden-layers L --hidden-dtype int8` (the issue's spelling; --dtype is
    the same option): int8 hidden states with a per-vector scale."""
    out = tmp_path / "corpus.zarr"
    p = cli_in_process("dump", "--teacher", lm, "--task", "lm", "--data-files", corpus / "train.jsonl", "--text-column",
                       "text", "--max-seq-length", "24", "--logits", "sample:8", "--hidden-layers", "1,2",
                       "--hidden-dtype", "int8", "--out", out)
    assert p.returncode == 0, show(p)
    lm_meta = open_store(str(out)).meta.lm
    assert lm_meta["hidden_dtype"] == "int8" and lm_meta["hidden_layers"] == [1, 2]
    assert lm_meta["targets"]["count"] == 8 and (out / "train" / "hidden_scale").is_dir()


def test_a_killed_lm_distill_resumes_to_the_same_student_bit_for_bit(store, tmp_path):
    """SIGKILL mid-epoch 2 of a causal-LM distill with gradient accumulation, then --resume: the same student and
    history as a run never stopped (the reader restarts at step x G forwards of the epoch's plan)."""
    import subprocess
    import sys

    from pkd_cache.testing import cli_env
    from test_resume import _student_files, kill_distill_mid_epoch_2

    base = ["distill", "--store", str(store.path), "--student-layers", "1", "--epochs", "3", "--max-tokens", "48",
            "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--seed", "5", "--logging-steps", "0",
            "--beta", "1"]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "pkd_cache", *base, *extra], env=cli_env(),  # noqa
                                        capture_output=True, text=True, timeout=600)
    p = run("--output-dir", str(tmp_path / "whole"))
    assert p.returncode == 0, show(p)
    out = tmp_path / "killed"
    kill_distill_mid_epoch_2([*base, "--save-steps", "1"], out)
    p = run("--output-dir", str(out), "--resume")
    assert p.returncode == 0 and "resuming at step" in p.stderr, show(p)
    assert _student_files(out) == _student_files(tmp_path / "whole")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert a["history"] == b["history"] and a["steps"] == b["steps"]


@pytest.mark.parametrize("busy", [True, False], ids=["inline", "thread"])
def test_rows_coded_inline_or_on_a_thread_are_the_same_bytes(lm, corpus, store, tmp_path, monkeypatch, busy):
    """Where the teacher keeps every core busy the rows are coded between batches, not on a thread: same store."""
    from pkd_cache.commands import dump_lm

    used = []
    for name in ("Consumer", "InlineConsumer"):
        cls = getattr(dump_lm, name)
        monkeypatch.setattr(dump_lm, name, type(name, (cls,), {"__init__": lambda self, *a, _c=cls, _n=name: (
            used.append(_n), _c.__init__(self, *a))[1]}))
    monkeypatch.setattr(dump_lm, "_cores_busy", lambda device: busy)
    out = _dump(lm, corpus, tmp_path / "s.zarr")
    assert set(used) == {"InlineConsumer" if busy else "Consumer"}
    assert read_json(Path(out.path) / "checksums.json")["chunks"] == \
        read_json(Path(store.path) / "checksums.json")["chunks"]


def test_the_rows_are_coded_inline_only_when_a_cpu_teacher_has_a_thread_on_every_core(monkeypatch):
    import os

    from pkd_cache.commands.dump_lm import _cores_busy

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert _cores_busy(torch.device("cpu")) and not _cores_busy(torch.device("cuda", 0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # torchrun's ranks: OMP_NUM_THREADS=1 each, say
    assert not _cores_busy(torch.device("cpu"))
