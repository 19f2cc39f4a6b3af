"""A loss (or gradient) that turns non-finite stops training with one line naming the step and the part, and no
non-finite model is ever saved: not as the student, not as a checkpoint; an earlier, finite best stays as it was."""
from __future__ import annotations

import hashlib
import importlib
import math

import pytest
import torch
from safetensors.torch import load_file

from pkd_cache.config import TrainConfig
from pkd_cache.errors import PkdCacheError
from pkd_cache.training import Member, train_many

pass_student = importlib.import_module("pkd_cache.commands.pass_student")  # a distill student's loss


def invoke(*args):
    from typer.testing import CliRunner

    from pkd_cache.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"PKD_CACHE_DEBUG": ""})
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def error_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error: ")]


def all_finite(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distill_args(store, init, out, *extra):
    return ["distill", "--store", store, "--output-dir", out, "--student-layers", "2", "--student-init", init,
            "--batch-size", "32", "--logging-steps", "0", *extra]


def test_loss_part_turning_nan_mid_run_stops_and_keeps_the_earlier_student(tmp_path, store_path, backbone_dir,
                                                                          monkeypatch):
    """Epoch 1 saves a finite best; at step 8 (epoch 2) loss_kd turns nan: one line naming step 8 and loss_kd, and
    the epoch-1 student is neither replaced nor joined by metrics.json."""
    out, calls, seen = tmp_path / "student", [0], {}
    real = pass_student.pkd_loss

    def poisoned(*args, **kwargs):
        calls[0] += 1
        total, parts = real(*args, **kwargs)
        if calls[0] == 8:  # 5 steps per epoch (160 examples, batch 32): the 3rd step of epoch 2
            seen["saved"] = digest(out / "model.safetensors")
            parts = {**parts, "loss_kd": parts["loss_kd"] * math.nan}
            total = total * math.nan
        return total, parts

    monkeypatch.setattr(pass_student, "pkd_loss", poisoned)
    r = invoke(*distill_args(store_path, backbone_dir, out, "--epochs", "2"))
    assert r.exit_code == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = error_lines(r)
    assert len(errors) == 1 and "step 8/10" in errors[0] and "loss_kd is nan" in errors[0], r.stderr
    assert "loss_ce" not in errors[0] and "grad_norm" not in errors[0]  # only the cause is named
    assert digest(out / "model.safetensors") == seen["saved"]  # the epoch-1 student, untouched
    assert all_finite(out / "model.safetensors")
    assert not (out / "metrics.json").exists()
    for ckpt in out.rglob("state.safetensors"):
        assert all_finite(ckpt)


@pytest.mark.parametrize("setting,part", [(["--learning-rate", "1e30"], None),  # the weights blow up on step 1
                                          (["--temperature", "1e-45"], "loss_kd")])  # logits / T overflow
def test_settings_that_make_the_loss_non_finite_save_nothing(tmp_path, store_path, backbone_dir, setting, part):
    out = tmp_path / "student"
    r = invoke(*distill_args(store_path, backbone_dir, out, "--epochs", "1", "--beta", "0", *setting))
    assert r.exit_code == 2, r.stderr
    errors = error_lines(r)
    assert len(errors) == 1 and "not finite" in errors[0] and "stopped without saving" in errors[0], r.stderr
    if part:
        assert f"step 1/5: {part} is nan" in errors[0], errors[0]
    assert not (out / "model.safetensors").exists()
    assert not (out / "metrics.json").exists()


def test_finetune_with_a_non_finite_loss_saves_no_teacher(tmp_path, backbone_dir, data_dir):
    """Teacher fine-tuning trains with the same loop (and the same stop)."""
    out = tmp_path / "teacher"
    r = invoke("finetune", "--model", backbone_dir, "--task", "sst2", "--data-dir", data_dir, "--output-dir", out,
               "--max-seq-length", "24", "--batch-size", "32", "--epochs", "1", "--learning-rate", "1e30",
               "--logging-steps", "0")
    assert r.exit_code == 2, r.stderr
    errors = error_lines(r)
    assert len(errors) == 1 and "not finite" in errors[0], r.stderr
    assert not (out / "model.safetensors").exists()


# --- the loop itself: gradients, and the GPU way (no host sync per step) ---------------------------------------------

def _member(loss_fn, saved: list, logging_steps: int = 0, max_grad_norm: float = 1.0, name: str = ""):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    cfg = TrainConfig(epochs=1, learning_rate=0.1, batch_size=1, logging_steps=logging_steps,
                      max_grad_norm=max_grad_norm)
    return Member(model, cfg, 6, lambda b: loss_fn(model, b), lambda: {"score": 0.0}, "score",
                  lambda: saved.append(True), name=name)


def _batches(epoch, start=0):
    return ({"step": i} for i in range(6))


def _loss(model, batch, bad_at: int = 3):
    loss = model(torch.ones(1, 3)).pow(2).mean()
    if batch["step"] + 1 == bad_at:
        loss = loss * math.inf
    return loss, {"loss_ce": loss.detach()}


@pytest.mark.parametrize("eager", [None, False], ids=["cpu-per-step", "gpu-way-deferred"])
def test_first_bad_step_is_named_on_either_path(eager):
    saved = []
    m = _member(_loss, saved, name="run-a")
    m.eager_finite_check = eager
    with pytest.raises(PkdCacheError) as e:
        train_many([m], 6, _batches)
    # the deferred check runs at the save after the epoch, yet names the first bad step, not the last
    assert str(e.value).startswith("run-a: step 3/6: loss_ce is inf"), str(e.value)
    assert saved == []


def test_deferred_check_fires_at_the_log_line():
    saved = []
    m = _member(_loss, saved, logging_steps=4)
    m.eager_finite_check = False
    for i in range(3):
        m.step({"step": i})  # step 3 is bad, but nothing syncs yet
    with pytest.raises(PkdCacheError, match="step 3/6: loss_ce is inf"):
        m.step({"step": 3})  # the log line at step 4 reads the flag


def test_finite_loss_with_non_finite_gradients_stops():
    def loss_fn(model, batch):
        if batch["step"] == 1:
            model.weight.register_hook(lambda g: g * math.inf)  # the loss stays finite, the gradient does not
        return model(torch.ones(1, 3)).pow(2).mean(), {}

    saved = []
    with pytest.raises(PkdCacheError, match=r"step 2/6: grad_norm is (inf|nan)"):
        train_many([_member(loss_fn, saved)], 6, _batches)
    assert saved == []


def test_without_clipping_non_finite_weights_are_never_saved():
    """max_grad_norm=0: no gradient norm to watch, so the weights are checked before the save."""
    def loss_fn(model, batch):
        if batch["step"] == 5:  # the last step: no later loss would show it
            model.weight.register_hook(lambda g: g * math.nan)
        return model(torch.ones(1, 3)).pow(2).mean(), {}

    saved = []
    with pytest.raises(PkdCacheError, match="after step 6/6 the weights are not finite"):
        train_many([_member(loss_fn, saved, max_grad_norm=0.0)], 6, _batches)
    assert saved == []


def test_overwrite_of_an_older_student_with_a_failing_run_keeps_the_older_one(tmp_path, store_path, backbone_dir):
    out = tmp_path / "student"
    assert invoke(*distill_args(store_path, backbone_dir, out, "--max-steps", "2")).exit_code == 0
    before = {p.name: digest(p) for p in out.iterdir() if p.is_file()}
    r = invoke(*distill_args(store_path, backbone_dir, out, "--overwrite", "--beta", "0", "--temperature", "1e-45"))
    assert r.exit_code == 2 and "step 1/" in error_lines(r)[0], r.stderr
    assert {p.name: digest(p) for p in out.iterdir() if p.is_file()} == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_watch_adds_no_host_sync_per_step(monkeypatch):
    """The per-step part of the check stays on the device; the flag is read at the save after the epoch."""
    real_watch = Member._watch

    def watch_without_syncs(self, step, values):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
        try:
            return real_watch(self, step, values)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Member, "_watch", watch_without_syncs)

    def loss_fn(model, batch):
        model.cuda()
        loss = model(torch.ones(1, 3, device="cuda")).pow(2).mean()
        return (loss * math.inf if batch["step"] == 2 else loss), {"loss_ce": loss.detach()}

    saved = []
    member = _member(loss_fn, saved)
    member.model.cuda()
    with pytest.raises(PkdCacheError, match="step 3/6: loss is inf"):
        train_many([member], 6, _batches)
    assert saved == []
