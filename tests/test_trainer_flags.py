"""Options as Trainer and run_glue.py users spell them and expect them to work: underscores, learning-rate
schedules, gradient clipping, dev scoring every N steps, the metric the best checkpoint is kept by, the eval batch,
loading threads."""
import contextlib
import importlib
import json
import math
import re
import struct

import pytest
import torch
from pkd_cache.testing import cli_in_process, show

from pkd_cache.config import DistillConfig, TrainConfig
from pkd_cache.training import Accumulation, Member, build_optimizer

distill_module = importlib.import_module("pkd_cache.commands.distill")  # `pkd_cache.commands.distill` is the function


def distill(store_path, backbone_dir, out, *extra):
    return cli_in_process("distill", "--store", store_path, "--student-init", backbone_dir, "--student-layers", "2",
                          "--output-dir", out, "--learning-rate", "1e-3", *extra)


@pytest.mark.parametrize("kind, expect", [
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 - math.cos(math.pi * 0.75)), 0.5]),
    ("constant_with_warmup", [0.5, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedules_follow_the_trainers_names(kind, expect):
    """2 warm-up steps of 6, then 4 steps to 0: the multiplier at steps 0..4 (the cosine is the Trainer's,
    0.5 (1 + cos(pi progress)))."""
    p = torch.nn.Parameter(torch.zeros(1))
    _, sched = build_optimizer([("w", p)], TrainConfig(warmup_ratio=0.34, lr_scheduler_type=kind), 6)
    got = [sched.lr_lambdas[0](s) for s in range(5)]
    assert got == pytest.approx(expect)


def test_underscore_spellings_mean_the_same_option(store_path, backbone_dir, tmp_path):
    p = cli_in_process("distill", "--store", store_path, "--output_dir", tmp_path / "x", "--num_train_epochs", "nan")
    assert p.returncode == 2 and p.stderr.strip() == "error: --epochs must be a finite number > 0, got nan", show(p)
    out = tmp_path / "student"
    p = cli_in_process("distill", "--store", store_path, "--student_init", backbone_dir, "--student_layers", "2",
                       "--output_dir", out, "--max_steps", "2", "--learning_rate", "1e-3", "--lr_scheduler_type",
                       "cosine", "--max_grad_norm", "0.5")
    assert p.returncode == 0, show(p)
    train = json.loads((out / "metrics.json").read_text())["config"]["train"]
    assert (train["max_steps"], train["lr_scheduler_type"], train["max_grad_norm"]) == (2, "cosine", 0.5)


def test_eval_every_n_steps_keeps_the_best_of_them(store_path, backbone_dir, tmp_path):
    """160 examples in batches of 32: 5 steps an epoch; 2 epochs, scored every 4 steps and after the last (10)."""
    out = tmp_path / "student"
    p = distill(store_path, backbone_dir, out, "--epochs", "2", "--eval-strategy", "steps", "--eval-steps", "4",
                "--metric-for-best-model", "eval_accuracy")
    assert p.returncode == 0, show(p)
    m = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in m["history"]] == [4, 8, 10]
    best = max(m["history"], key=lambda h: h["validation_accuracy"])
    assert (m["best_step"], m["best_validation_accuracy"]) == (best["step"], best["validation_accuracy"])
    said = " ".join(p.stderr.split())
    assert "step 4: validation_accuracy" in said and "step 10: validation_accuracy" in said


def test_eval_strategy_no_scores_once_at_the_end(store_path, backbone_dir, tmp_path):
    out = tmp_path / "student"
    p = distill(store_path, backbone_dir, out, "--epochs", "2", "--eval-strategy", "no",
                "--per-device-eval-batch-size", "7", "--dataloader-num-workers", "0")
    assert p.returncode == 0, show(p)
    m = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in m["history"]] == [10] and m["best_step"] == 10
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("extra, says", [
    (["--metric-for-best-model", "f1"], "--metric-for-best-model 'f1': sst2 is scored by accuracy (or one split's: "
                                        "validation_accuracy)"),
    (["--eval-steps", "3"], "--eval-steps needs --eval-strategy steps"),
    (["--lr-scheduler-type", "polynomial"], "--lr-scheduler-type must be one of linear, cosine, "
                                            "constant_with_warmup, got 'polynomial'"),
    (["--eval-strategy", "sometimes"], "--eval-strategy must be one of epoch, steps, no, got 'sometimes'"),
])
def test_bad_trainer_flags_are_one_line(store_path, backbone_dir, tmp_path, extra, says):
    p = distill(store_path, backbone_dir, tmp_path / "student", *extra)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {says}", show(p)
    assert not (tmp_path / "student").exists()


def test_bf16_trains_the_student_under_autocast(store_path, backbone_dir, tmp_path):
    """On CPU: bfloat16 autocast for the student's forward (the loss in float32). It trains (a finite best metric,
    weights that moved) and differs from the float32 run only by rounding. --fp16 is CUDA's for users: on CPU it is
    refused with one line (the tests below run its path on CPU through a seam)."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        p = distill(store_path, backbone_dir, tmp_path / name, "--max-steps", "3", "--seed", "0", *extra)
        assert p.returncode == 0, show(p)
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    diff = max(float((runs["fp32"][k] - runs["bf16"][k]).abs().max()) for k in runs["fp32"])
    assert 0 < diff < 0.05, diff  # bf16 rounding changes the steps a little, not the training
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["config"]["bf16"] is True
    p = distill(store_path, backbone_dir, tmp_path / "fp16", "--fp16", "--device", "cpu")
    assert p.returncode == 2 and p.stderr.strip() == ("error: --fp16 needs a CUDA GPU (its loss scaling is "
                                                      "CUDA's), and this run is on cpu; use --bf16, or neither"), show(p)
    assert not (tmp_path / "fp16").exists()


def test_report_to_tensorboard_writes_the_curves(store_path, backbone_dir, tmp_path):
    """--report-to tensorboard: event files in the student's runs/ with the loss parts, the learning rate and the
    dev scores; an integration that is not installed (here: wandb) is one line, and training goes on."""
    pytest.importorskip("tensorboard")
    import importlib.util

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "student"
    asked = "tensorboard" if importlib.util.find_spec("wandb") else "tensorboard,wandb"
    p = distill(store_path, backbone_dir, out, "--epochs", "2", "--logging-steps", "2", "--report-to", asked)
    assert p.returncode == 0, show(p)
    if "wandb" in asked:
        assert "--report-to wandb: wandb is not installed here; not reporting to it" in p.stderr, show(p)
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_kd", "train/learning_rate",
            "eval/validation_accuracy"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10]
    m = json.loads((out / "metrics.json").read_text())
    assert [e.value for e in events.Scalars("eval/validation_accuracy")] == pytest.approx(
        [h["validation_accuracy"] for h in m["history"]])


def test_fp16_trains_the_student_under_autocast_with_a_grad_scaler(store_path, backbone_dir, tmp_path, monkeypatch):
    """--fp16's real path (float16 autocast for the student's forward, GradScaler: scaled loss over 2 accumulated
    micro-batches, unscale_ before clipping, step, update), run on CPU through the tests' device seam (users get it
    on CUDA only). 3 steps train (the weights move) and land where float32 does up to fp16 rounding: the mean
    difference under 10% of the mean move. The checkpoint holds the scaler's state: 2**16, 3 steps without an
    overflow."""
    from safetensors.torch import load_file

    monkeypatch.setattr(distill_module, "FP16_DEVICES", ("cuda", "cpu"))
    common = ["--max-steps", "3", "--seed", "0", "--logging-steps", "1", "--per-device-train-batch-size", "16",
              "--gradient-accumulation-steps", "2", "--save-steps", "1", "--save-total-limit", "1"]
    runs = {}
    for name, extra in (("fp32", []), ("fp16", ["--fp16"])):
        p = distill(store_path, backbone_dir, tmp_path / name, *common, *extra)
        assert p.returncode == 0, show(p)
        assert "2 accumulation step(s)" in p.stderr and len(re.findall(r"step \d/3 .* loss \d", p.stderr)) == 3, show(p)
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    init = {f"bert.{k}": v for k, v in load_file(str(backbone_dir / "model.safetensors")).items()}
    keys = [k for k in init if k in runs["fp32"]]
    assert keys
    mean = lambda a, b: sum(float((a[k] - b[k]).abs().sum()) for k in keys) / sum(a[k].numel() for k in keys)  # noqa
    moved, rounding = mean(runs["fp32"], init), mean(runs["fp16"], runs["fp32"])
    assert mean(runs["fp16"], init) > 0.5 * moved > 0 and 0 < rounding < 0.1 * moved, (moved, rounding)
    assert all(bool(torch.isfinite(t).all()) for t in runs["fp16"].values())
    state = json.loads((tmp_path / "fp16" / "checkpoint-3" / "state.json").read_text())
    assert (state["scaler"]["scale"], state["scaler"]["_growth_tracker"]) == (2.0 ** 16, 3), state["scaler"]
    assert json.loads((tmp_path / "fp32" / "checkpoint-3" / "state.json").read_text())["scaler"] is None


def _fp16_member(gains: dict, scaler: bool = True) -> Member:
    """A Linear(3, 1) under float16 autocast, its batch of 4 rows in 2 micro-batches, clipped at 1.0. Step i's loss is
    multiplied by gains[i] (a finite loss in float32 whose float16 gradient overflows once scaled)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    cfg = TrainConfig(epochs=1, learning_rate=0.1, batch_size=4, logging_steps=0, max_grad_norm=1.0)

    def loss_fn(batch):
        with torch.autocast("cpu", dtype=torch.float16) if scaler else contextlib.nullcontext():
            out = model(batch["x"])
        loss = (out.float() * gains.get(batch["step"], 1.0)).pow(2).mean()
        return loss, {"loss_ce": loss.detach()}

    split = lambda b: [({**b, "x": b["x"][:2]}, 0.5), ({**b, "x": b["x"][2:]}, 0.5)]  # noqa: E731
    return Member(model, cfg, 6, loss_fn, lambda: {"score": 0.0}, "score", lambda: None,
                  accumulation=Accumulation(split), scaler=torch.amp.GradScaler("cpu") if scaler else None)


def test_fp16_scaler_skips_a_step_whose_gradients_overflow_and_resumes_with_its_scale():
    """Step 2's loss is finite but its scaled float16 gradient is not: the scaler skips that step (the weights and
    the optimiser's step count stay as they were, no error: an overflow is expected under fp16) and halves its
    scale; step 3 trains again. Step 1 matches float32 to 1e-3 (the weights move by 0.1). A checkpoint restores
    the halved scale into a fresh scaler."""
    batch = lambda i: {"step": i, "x": torch.arange(12.0).reshape(4, 3) / 10}  # noqa: E731
    fp32, m = _fp16_member({}, scaler=False), _fp16_member({2: 1e6})
    weights = lambda member: torch.cat([p.detach().flatten().clone() for _, p in member.params])  # noqa: E731
    start = weights(m)
    m.step(batch(1))
    fp32.step(batch(1))
    after_1 = weights(m)
    assert not torch.equal(after_1, start) and torch.allclose(after_1, weights(fp32), atol=1e-3)
    assert m.scaler.get_scale() == 2.0 ** 16
    m.step(batch(2))
    assert torch.equal(weights(m), after_1) and m.scaler.get_scale() == 2.0 ** 15
    assert {int(s["step"]) for s in m.opt.state.values()} == {1}
    m.step(batch(3))
    assert not torch.equal(weights(m), after_1) and bool(torch.isfinite(weights(m)).all())
    tensors, meta = m.state()
    resumed = _fp16_member({})
    resumed.load_state(tensors, meta)
    assert resumed.scaler.state_dict() == m.scaler.state_dict() == meta["scaler"]
    assert meta["scaler"]["scale"] == 2.0 ** 15


def _wandb_history(folder) -> tuple:
    """An offline wandb run's `RunRecord` (project, name) and history rows, from its `.wandb` transaction log (wandb.Api
    needs the server): LevelDB's log format (a 7-byte file header; records of crc32, length, type in 32 KiB blocks)
    holding protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    run, rows = None, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            run = record.run if record.HasField("run") else run
            if record.HasField("history"):
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return run, rows


def test_report_to_wandb_logs_the_curves_offline(store_path, backbone_dir, tmp_path, monkeypatch):
    """--report-to wandb, offline: a run in WANDB_PROJECT named after the output folder, its files in the student's
    folder, the loss parts and learning rate at every log step and the dev scores at each epoch's step, under the
    names TensorBoard gets."""
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "pkd-test"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "student"
    p = distill(store_path, backbone_dir, out, "--epochs", "2", "--logging-steps", "2", "--report-to", "wandb")
    assert p.returncode == 0, show(p)
    run, rows = _wandb_history(out)
    assert (run.project, run.display_name) == ("pkd-test", "student")
    train = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in train] == [2, 4, 6, 8, 10]
    assert all({"train/loss_ce", "train/loss_kd", "train/learning_rate"} <= set(r) for r in train)
    assert all(math.isfinite(r["train/loss"]) for r in train) and train[-1]["train/learning_rate"] == 0
    m = json.loads((out / "metrics.json").read_text())
    dev = [(r["_step"], r["eval/validation_accuracy"]) for r in rows if "eval/validation_accuracy" in r]
    assert dev == [(h["step"], pytest.approx(h["validation_accuracy"])) for h in m["history"]] and len(dev) == 2
    # the students of one pass (a sweep's) are runs of their own, each with its curves (not one shared run)
    distill_module.distill_many([DistillConfig(
        store=str(store_path), output_dir=str(tmp_path / name), student_init=str(backbone_dir), student_layers=2,
        alpha=alpha, report_to=["wandb"], train=TrainConfig(max_steps=2, logging_steps=1, learning_rate=1e-3))
        for name, alpha in (("a", 0.5), ("b", 0.9))])
    for name in ("a", "b"):
        run, rows = _wandb_history(tmp_path / name)
        assert run.display_name == name and [r["_step"] for r in rows if "train/loss" in r] == [1, 2], rows


def test_report_to_mlflow_logs_the_curves_and_ends_a_failed_run(store_path, backbone_dir, tmp_path, monkeypatch):
    """--report-to mlflow into a local file store: a run failing at step 1 ends as FAILED (not left active to refuse
    the next run in this process); the next is FINISHED, in MLFLOW_EXPERIMENT_NAME, named after the output folder,
    with the config as params and the loss and dev scores at their steps. Metric names mlflow refuses are made
    valid; over-long params are cut to its limit."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from pkd_cache.reporting import Reporter

    uri = f"file:{tmp_path / 'mlruns'}"
    for k, v in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true",  # mlflow 3's file store: opt in
                 "MLFLOW_EXPERIMENT_NAME": "pkd-test", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "student"
    p = distill(store_path, backbone_dir, out, "--max-steps", "2", "--report-to", "mlflow", "--learning-rate", "1e30")
    assert p.returncode == 2 and "not finite" in p.stderr, show(p)
    p = distill(store_path, backbone_dir, out, "--epochs", "2", "--logging-steps", "2", "--report-to", "mlflow")
    assert p.returncode == 0, show(p)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pkd-test").experiment_id], order_by=["start_time"])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("student", "FAILED"), ("student", "FINISHED")]
    run = runs[1]
    assert run.data.params["train.learning_rate"] == "0.001" and run.data.params["student_layers"] == "2"
    history = lambda key: [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, key)]  # noqa
    assert [s for s, _ in history("train/loss")] == [2, 4, 6, 8, 10] == [s for s, _ in history("train/loss_kd")]
    assert all(math.isfinite(v) for _, v in history("train/loss"))
    m = json.loads((out / "metrics.json").read_text())
    assert history("eval/validation_accuracy") == [(h["step"], pytest.approx(h["validation_accuracy"]))
                                                   for h in m["history"]]
    r = Reporter(["mlflow"], tmp_path, "odd", {"note": "x" * (MAX_PARAM_VAL_LENGTH + 10)})
    r.log(1, {"eval/f1(macro)": 0.5})
    r.close()
    (odd,) = client.search_runs([runs[0].info.experiment_id], "attributes.run_name = 'odd'")
    assert odd.data.metrics == {"eval/f1_macro_": 0.5} and odd.data.params["note"] == "x" * MAX_PARAM_VAL_LENGTH


def test_do_predict_writes_the_test_predictions_as_run_glue_does(store_path, backbone_dir, data_dir, tmp_path):
    """GLUE's test.tsv (index and sentence, no label): `predict_results_sst2.txt`, a header and one label name per
    example in file order, from the best student (the one saved). A missing test file is refused before
    training."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "SST-2"
    shutil.copytree(data_dir, data)
    out = tmp_path / "student"
    p = distill(store_path, backbone_dir, out, "--max-steps", "2", "--do-predict", "--data-dir", data)
    assert p.returncode == 2 and "no file for split 'test' of sst2" in p.stderr and not out.exists(), show(p)
    sentences = ["a great film", "dull and long", "not bad at all", "the worst"]
    (data / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(sentences)))
    p = distill(store_path, backbone_dir, out, "--max-steps", "2", "--do-predict", "--data-dir", data)
    assert p.returncode == 0, show(p)
    lines = (out / "predict_results_sst2.txt").read_text().splitlines()
    model, tok = AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        want = model(**tok(sentences, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    assert lines == ["index\tprediction"] + [f"{i}\t{['negative', 'positive'][y]}" for i, y in enumerate(want)]
    assert json.loads((out / "metrics.json").read_text())["predictions"] == ["predict_results_sst2.txt"]


def test_save_total_limit_keeps_the_last_n_checkpoints(store_path, backbone_dir, tmp_path):
    """--save-steps 2 over 10 steps (2 epochs) with --save-total-limit 2: the checkpoints of steps 8 and 10 are
    kept as checkpoint-8/ and checkpoint-10/ (each resumable state), the rolling resume checkpoint is gone, and an
    --overwrite later replaces the folder as pkd-cache's own."""
    out = tmp_path / "student"
    p = distill(store_path, backbone_dir, out, "--epochs", "2", "--save-steps", "2", "--save-total-limit", "2")
    assert p.returncode == 0, show(p)
    assert sorted(q.name for q in out.glob("checkpoint*")) == ["checkpoint-10", "checkpoint-8"]
    state = json.loads((out / "checkpoint-8" / "state.json").read_text())
    assert state["position"]["step"] == 8 and (out / "checkpoint-8" / "state.safetensors").is_file()
    p = distill(store_path, backbone_dir, out, "--max-steps", "1", "--overwrite")
    assert p.returncode == 0 and not list(out.glob("checkpoint*")), show(p)
