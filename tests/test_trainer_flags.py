"""Options as Trainer and run_glue.py users spell them and expect them to work: underscores, learning-rate
schedules, gradient clipping, dev scoring every N steps, the metric the best checkpoint is kept by, the eval batch,
loading threads."""
import json
import math

import pytest
import torch
from pkd_cache.testing import cli_in_process, show

from pkd_cache.config import TrainConfig
from pkd_cache.training import build_optimizer


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
    weights that moved) and differs from the float32 run only by rounding. fp16's GradScaler needs CUDA, which
    this machine has not: that path is refused here with one line, and untested."""
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
