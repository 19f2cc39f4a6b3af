"""Dump under torchrun (gloo, 2 CPU ranks): the store equals a one-process dump byte for byte, and a dump killed
with one rank count is finished with another."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pkd_cache.testing import write_sst2
from pkd_cache.testing import cli_env, show
from test_resume import files, wait_for_progress

from pkd_cache.distributed import balanced_shares
from pkd_cache.commands.dump_shares import window_tokens

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # torchrun with 2 ranks

ARGS = ["--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64", "--sort-window", "128"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sst2(tmp_path_factory.mktemp("dist") / "SST-2", n_train=1200, n_dev=100)


def dump_cmd(teacher, data, out, ranks: int, *extra) -> list[str]:
    args = ["dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(data), "--out", str(out), *ARGS,
            *extra]
    if ranks == 1:
        return [sys.executable, "-m", "pkd_cache", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "pkd_cache", *args]


def run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, data):
    out = tmp_path_factory.mktemp("ref") / "one.zarr"
    p = run(dump_cmd(teacher_dir, data, out, 1))
    assert p.returncode == 0, show(p)
    return out


def attributes(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def assert_same_store(store: Path, reference: Path) -> None:
    a, b = files(store), files(reference)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # every chunk and checksums.json, byte for byte
    meta, ref = attributes(store), attributes(reference)
    assert meta["complete"] and meta["cache_key"] == ref["cache_key"] and meta["splits"] == ref["splits"]


def test_two_ranks_write_the_same_store_as_one(tmp_path, teacher_dir, data, reference):
    out = tmp_path / "two.zarr"
    p = run(dump_cmd(teacher_dir, data, out, 2))
    assert p.returncode == 0, show(p)
    assert "2 ranks" in p.stderr and "(rank 1/2)" in p.stderr  # both ranks ran a share
    assert_same_store(out, reference)
    assert attributes(out)["dump_ranks"] == 2
    p = run(dump_cmd(teacher_dir, data, out, 2))
    assert p.returncode == 0 and "cache hit" in p.stderr, show(p)


def kill_every_rank(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a lost node would. torchrun starts each rank in a session of
    its own, so killing the launcher's process group alone leaves the ranks running."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            pass
    pids, i = [proc.pid], 0
    while i < len(pids):
        pids += [pid for pid, parent in parents.items() if parent == pids[i]]
        i += 1
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # frozen first, so no rank moves on while the others die
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait(timeout=60)


def kill_after_progress(cmd, out: Path, records: int) -> None:
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_progress(out, proc, records)
    kill_every_rank(proc)
    assert not attributes(out)["complete"]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
@pytest.mark.kill
def test_a_killed_dump_is_finished_with_another_rank_count(tmp_path, teacher_dir, data, reference, first, then):
    out = tmp_path / "killed.zarr"
    kill_after_progress(dump_cmd(teacher_dir, data, out, first), out, records=5)
    p = run(dump_cmd(teacher_dir, data, out, then, "--resume"))
    assert p.returncode == 0 and "resumed" in p.stderr, show(p)
    assert_same_store(out, reference)


def test_shares_balance_tokens_not_examples():
    costs = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    shares = balanced_shares(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(11))  # disjoint, and all of them
    assert [sum(costs[i] for i in s) for s in shares] == [10.0, 10.0]
    assert balanced_shares([1.0, 1.0], 3) == [[0], [1], []]
    import numpy as np
    lengths = np.array([5, 3, 9, 1])
    assert window_tokens(lengths, 2, 16, bucketed=True) == 9 * 2 + 3 * 2  # sorted: [9, 5] [3, 1]
    assert window_tokens(lengths, 2, 16, bucketed=False) == 4 * 16


def distill_cmd(store, init, out, ranks: int, *extra, max_steps: int = 6) -> list[str]:
    """`store` is a store's path, or the arguments that stand for one (online KD: --teacher ...)."""
    source = store if isinstance(store, list) else ["--store", str(store)]
    args = ["distill", *source, "--student-layers", "2", "--student-init", str(init), "--batch-size",
            "15", "--max-steps", str(max_steps), "--learning-rate", "1e-3", "--seed", "0", "--output-dir", str(out),
            *extra]
    if ranks == 1:
        return [sys.executable, "-m", "pkd_cache", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "pkd_cache", *args]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_ranks_train_the_student_one_rank_trains(tmp_path, store_path, backbone_dir):
    """Dropout is off in these models: 2 ranks with 8 and 7 rows of each 15-row batch, in micro-batches of 4 (so
    of unequal sizes, weighted by their rows), train the 1-rank student step for step
    (the checkpoint kept is the one after the last step: one epoch, evaluated once)."""
    p = train_on_one_and_two_ranks(store_path, backbone_dir, tmp_path)
    assert p.stderr.count("best validation_accuracy") == 1  # rank 0 alone evaluates, saves and reports


def train_on_one_and_two_ranks(source, backbone_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Train from `source` on 1 rank, then on 2 in micro-batches of 4; assert they are the same student, and that it
    did train. Returns the 2-rank run."""
    one, two = tmp_path / "one", tmp_path / "two"
    p = run(distill_cmd(source, backbone_dir, one, 1))
    assert p.returncode == 0, show(p)
    p = run(distill_cmd(source, backbone_dir, two, 2, "--gradient-accumulation-steps", "2"))  # 8 -> 4+4, 7 -> 4+3
    assert p.returncode == 0, show(p)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["ranks"], m2["ranks"], m1["steps"], m2["steps"]) == (1, 2, 6, 6)
    assert m1.get("online_teacher") == m2.get("online_teacher")
    w1, w2, start = weights(one), weights(two), weights_of_init(backbone_dir)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    moved = max(float((w1[k] - start[k]).abs().max()) for k in w1 if k in start)
    assert diff < 1e-5 and moved > 1e-3, (diff, moved)  # the same student, and it did train
    return p


def test_online_kd_under_two_ranks_trains_the_one_rank_student(tmp_path, teacher_dir, data_dir, backbone_dir):
    """distill --teacher (no store) under torchrun: each rank runs the teacher on its own part of every batch, and
    the student is the 1-rank online student."""
    online = ["--teacher", str(teacher_dir), "--task", "sst2", "--data-dir", str(data_dir), "--max-seq-length", "24",
              "--chunk-size", "64"]
    train_on_one_and_two_ranks(online, backbone_dir, tmp_path)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["online_teacher"] == str(teacher_dir)


def test_online_kd_runs_the_teacher_on_each_ranks_own_rows(teacher_dir, data_dir):
    """The 2-rank test above cannot see a rank that trains on the whole batch (AdamW does not feel the doubled
    gradient), so this checks the parts directly: rank r's batch is its rows of the 1-rank batch, with the logits and
    CLS the teacher gives those rows in the whole batch."""
    import torch

    from pkd_cache.online import OnlineSource
    from pkd_cache.store import ARRAYS

    source = OnlineSource(str(teacher_dir), "sst2", str(data_dir), 24, 64, torch.device("cpu"))

    def batches(shard):
        return list(source.batches("train", 15, seed=0, epoch=1, layers=[1, 3], fields=ARRAYS, shard=shard))

    whole, parts = batches((0, 1)), [batches((r, 2)) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 11
    for i, batch in enumerate(whole):
        for k, atol in (("labels", 0), ("logits", 1e-5), ("cls", 1e-5)):
            torch.testing.assert_close(torch.cat([p[i][k] for p in parts]), batch[k], rtol=0, atol=atol)
        sizes = [len(p[i]["labels"]) for p in parts]
        assert min(sizes) > 0 and max(sizes) - min(sizes) <= 1  # halves, not the whole batch twice


@pytest.mark.kill
def test_a_killed_two_rank_distill_resumes_with_each_ranks_dropout(tmp_path, store_path, backbone_dir):
    """Dropout on: a 2-rank distill killed mid-run and resumed with 2 ranks trains the uninterrupted 2-rank
    student. The checkpoint holds every rank's RNG state; with rank 0's alone, rank 1's dropout would change."""
    init = tmp_path / "init"
    shutil.copytree(backbone_dir, init)
    config = json.loads((init / "config.json").read_text())
    config.update(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    (init / "config.json").write_text(json.dumps(config))
    options = ("--epochs", "4", "--save-steps", "3", "--logging-steps", "0")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    p = run(distill_cmd(store_path, init, whole, 2, *options, max_steps=-1))
    assert p.returncode == 0, show(p)
    steps = json.loads((whole / "metrics.json").read_text())["steps"]

    proc = subprocess.Popen(distill_cmd(store_path, init, killed, 2, *options, max_steps=-1), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = killed / "checkpoint" / "state.json"
    while True:  # stop every rank at once after the second mid-run checkpoint, far from the end
        try:
            if json.loads(state.read_text())["position"]["step"] >= 6:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    kill_every_rank(proc)
    stopped = json.loads(state.read_text())["position"]["step"]
    assert stopped < steps and not (killed / "metrics.json").exists()
    p = run(distill_cmd(store_path, init, killed, 2, *options, "--resume", max_steps=-1))
    assert p.returncode == 0 and f"resuming at step {stopped}" in p.stderr, show(p)
    a, b = weights(whole), weights(killed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def weights_of_init(backbone: Path) -> dict:
    """The backbone's weights under the student's names (bert.*), for the layers both have."""
    return {f"bert.{k}": v for k, v in weights(backbone).items()}


def test_a_multi_rank_dump_refuses_arrow_with_one_line(tmp_path, teacher_dir, data):
    p = run(dump_cmd(teacher_dir, data, tmp_path / "s.arrow", 2, "--format", "arrow"))
    assert p.returncode != 0
    said = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    # each rank finds the error and says it; torchrun may stop the slower rank before it does (a CI run saw one)
    assert said and set(said) == {"error: a multi-rank dump writes zarr stores only; run --format arrow as one "
                                  "process"}, show(p)
    assert "/pkd_cache/" not in p.stderr, show(p)  # no frame of ours (torchrun prints a traceback of its own)
    assert not (tmp_path / "s.arrow").exists()


def two_rank_distill(store, init, out, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pkd_cache",
            "distill", "--store", str(store), "--student-layers", "2", "--student-init", str(init), "--epochs", "1",
            "--output-dir", str(out), *extra]


def test_per_device_means_per_device_on_two_ranks(tmp_path, store_path, backbone_dir):
    """The trap this fixes: `--per-device-train-batch-size 8` on 2 ranks with 2 accumulation steps is a global batch
    of 8 x 2 x 2 = 32 (it used to be an alias of the global --batch-size: 8 in all). A pair that disagrees stops
    every rank with one line, before anything is written."""
    out = tmp_path / "student"
    p = run(two_rank_distill(store_path, backbone_dir, out, "--per-device-train-batch-size", "8",
                             "--gradient-accumulation-steps", "2"))
    assert p.returncode == 0, show(p)
    m = json.loads((out / "metrics.json").read_text())
    assert m["batch"] == {"global": 32, "ranks": 2, "per_device": 8, "gradient_accumulation_steps": 2}
    assert m["steps"] == 5  # 160 examples / 32
    p = run(two_rank_distill(store_path, backbone_dir, tmp_path / "other", "--batch-size", "64",
                             "--per-device-train-batch-size", "16"))
    said = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and said and set(said) == {
        "error: --batch-size 64 (the global batch) disagrees with --per-device-train-batch-size 16 x 2 rank(s) x "
        "--gradient-accumulation-steps 1 = 32; give only one of the two (or add --gradient-accumulation-steps 2)"}, \
        show(p)
    assert not (tmp_path / "other").exists()


def test_lm_distill_on_two_ranks_equals_two_accumulation_steps_on_one(tmp_path):
    """A causal-LM student from a token store under torchrun: each rank takes every other batch of the epoch's
    plan, DDP averages the two ranks' gradients, rank 0 writes the student. One process with
    --gradient-accumulation-steps 2 takes the same two batches per step, each weighted 1/2, so (with no dropout)
    its student is the two-rank one up to float rounding."""
    from safetensors.torch import load_file
    from pkd_cache.testing import make_causal_lm, synthetic_rows, write_jsonl

    import pkd_cache
    from pkd_cache.store.token_stream import steps_per_epoch

    lm = make_causal_lm(tmp_path / "gpt2")
    config = json.loads((lm / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the ranks' dropout streams differ
    (lm / "config.json").write_text(json.dumps(config))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": s} for s, _ in synthetic_rows(120, 3)])
    store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(lm), task="lm", data_files=[str(corpus)],
                                                validation_files=[str(corpus)], out=str(tmp_path / "lm.zarr"),
                                                max_seq_length=24, chunk_tokens=64, logits="sample:8"))
    args = ["distill", "--store", store.path, "--student-layers", "1", "--epochs", "1", "--max-tokens", "48",
            "--learning-rate", "1e-3", "--logging-steps", "1"]
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "pkd_cache", *args, "--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, show(two)
    one = run([sys.executable, "-m", "pkd_cache", *args, "--gradient-accumulation-steps", "2", "--output-dir",
               str(tmp_path / "one")])
    assert one.returncode == 0, show(one)
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert m2["ranks"] == 2 and m2["steps"] == steps_per_epoch(store, "train", 48, 2) == m1["steps"] > 1
    assert math.isclose(m2["best_eval_loss"], m1["best_eval_loss"], rel_tol=1e-4), (m1, m2)
    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    init = load_file(str(lm / "model.safetensors"))
    moved = max(float((w1[k] - init[k]).abs().max()) for k in w1 if k in init and init[k].shape == w1[k].shape)
    gap = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved > 1e-3 and gap < 1e-5, (moved, gap)


def test_lm_dump_on_two_ranks_equals_one_process_byte_for_byte(tmp_path):
    """`dump --task lm` under torchrun: each rank writes its half of the rows (running the one-process dump's teacher
    batches that touch them), rank 0 finishes the store; every chunk file equals the one-process dump's."""
    from pkd_cache.testing import make_causal_lm, synthetic_rows, write_jsonl

    lm = make_causal_lm(tmp_path / "gpt2")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": s} for s, _ in synthetic_rows(120, 3)])
    args = ["dump", "--teacher", str(lm), "--task", "lm", "--data-files", str(corpus), "--validation-file",
            str(corpus), "--max-seq-length", "24", "--chunk-tokens", "64", "--logits", "sample:8", "--hidden-layers",
            "1", "--batch-size", "3"]
    one = run([sys.executable, "-m", "pkd_cache", *args, "--out", str(tmp_path / "one.zarr")])
    assert one.returncode == 0, show(one)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "pkd_cache", *args, "--out", str(tmp_path / "two.zarr")])
    assert two.returncode == 0 and "2 ranks" in two.stderr, show(two)
    chunks = [json.loads((tmp_path / f"{n}.zarr" / "checksums.json").read_text())["chunks"] for n in ("one", "two")]
    assert len(chunks[0]) > 20 and chunks[0] == chunks[1]
    meta = json.loads((tmp_path / "two.zarr" / "zarr.json").read_text())["attributes"]
    assert meta["complete"] and meta["dump_ranks"] == 2
    p = run([sys.executable, "-m", "pkd_cache", "verify", str(tmp_path / "two.zarr")])
    assert p.returncode == 0, show(p)
