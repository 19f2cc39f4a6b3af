"""Every numeric option, swept over nan, inf, -inf, 0 and a negative: refused with one `error:` line naming the
flag (exit 2) before any work, or, where the value is legal, accepted. The legal ranges are written out here
again, independently of the metadata in pkd_cache/config.py, so that a range dropped or loosened there fails."""
from __future__ import annotations

import json
import math
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from pkd_cache.config import DistillConfig, DumpConfig, EvalConfig, FinetuneConfig, TrainConfig
from pkd_cache.errors import PkdCacheError

BAD_FLOATS = ["nan", "inf", "-inf", "0", "-1"]
BAD_INTS = ["0", "-1"]

# field -> is this (finite) value legal? The one source of truth for this test, not the code's.
LEGAL = {
    "epochs": lambda v: v > 0, "learning_rate": lambda v: v > 0, "batch_size": lambda v: v > 0,
    "weight_decay": lambda v: v >= 0, "warmup_ratio": lambda v: 0 <= v < 1, "max_grad_norm": lambda v: v >= 0,
    "seed": lambda v: v >= 0, "logging_steps": lambda v: v >= 0, "max_steps": lambda v: v > 0 or v == -1,
    "save_steps": lambda v: v >= 0, "max_seq_length": lambda v: v > 0, "max_train_samples": lambda v: v > 0,
    "max_eval_samples": lambda v: v > 0, "chunk_size": lambda v: v > 0, "sort_window": lambda v: v > 0,
    "max_examples": lambda v: v > 0, "student_layers": lambda v: v > 0, "alpha": lambda v: 0 <= v <= 1,
    "beta": lambda v: v >= 0, "temperature": lambda v: v > 0, "per_device_train_batch_size": lambda v: v > 0,
    "gradient_accumulation_steps": lambda v: v > 0, "eval_steps": lambda v: v > 0,
    "per_device_eval_batch_size": lambda v: v > 0, "dataloader_num_workers": lambda v: v >= 0,
    "save_total_limit": lambda v: v > 0, "sample_seed": lambda v: v >= 0, "chunk_tokens": lambda v: v > 0,
    "max_tokens": lambda v: v > 0,
}


def _numeric_fields(cls) -> list[tuple[str, bool]]:
    """(name, is_int) of every int or float field of a config dataclass, Optional ones included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kinds = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
        if kinds <= {int, float} and kinds:
            out.append((f.name, kinds == {int}))
    return out


def _make(cls, **kw):
    base = {FinetuneConfig: dict(model="m", task="sst2", output_dir="o"),
            DumpConfig: dict(teacher="t", task="sst2", out="o"), DistillConfig: dict(store="s", output_dir="o"),
            EvalConfig: dict(model="m", task="sst2"), TrainConfig: {}}[cls]
    return cls(**base, **kw)


CONFIGS = [TrainConfig, FinetuneConfig, DumpConfig, DistillConfig, EvalConfig]


def test_every_numeric_field_has_a_range():
    for cls in CONFIGS:
        for name, _ in _numeric_fields(cls):
            assert name in LEGAL, f"{cls.__name__}.{name}: a numeric field this test does not know"
            assert "range" in next(f for f in fields(cls) if f.name == name).metadata, f"{cls.__name__}.{name}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_configs_refuse_out_of_range_and_non_finite_values(cls):
    """config.check() directly: the Python API gets the same checks as the CLI (which builds these configs)."""
    checked = 0
    for name, is_int in _numeric_fields(cls):
        values = [0, -1, -7, 2**40] if is_int else [math.nan, math.inf, -math.inf, 0.0, -1.0, -5.0, 0.5, 1.0, 1.5]
        for v in values:
            cfg = _make(cls, **{name: v})
            flag = "--" + name.replace("_", "-")
            legal = math.isfinite(v) and LEGAL[name](v) and not (is_int and v > 2**31)
            if legal:
                cfg.check()
                continue
            with pytest.raises(PkdCacheError) as e:
                cfg.check()
            message = str(e.value)
            assert message.startswith(f"{flag} must be "), (name, v, message)
            assert "\n" not in message
            if not math.isfinite(v):
                assert "must be a finite number" in message and str(v) in message, message
            checked += 1
    assert checked > 0


def test_api_values_of_the_wrong_type_are_one_line():
    for cfg, flag in ((TrainConfig(batch_size=3.0), "--batch-size"), (TrainConfig(learning_rate="1e-3"),
                                                                        "--learning-rate"),
                      (DistillConfig(store="s", output_dir="o", alpha=True), "--alpha")):
        with pytest.raises(PkdCacheError, match=f"^{flag} must be an? (integer|number) "):
            cfg.check()


def test_dump_finetune_options_are_named_as_on_the_command_line():
    for train, expected in ((TrainConfig(epochs=math.nan), "--finetune-epochs must be a finite number > 0, got nan"),
                            (TrainConfig(learning_rate=-1.0), "--finetune-learning-rate must be > 0, got -1.0"),
                            (TrainConfig(seed=-1), "--seed must be >= 0, got -1")):
        for finetune in (True, False):  # a nonsense value is refused even when it would not be used
            with pytest.raises(PkdCacheError) as e:
                DumpConfig(teacher="t", task="sst2", out="o", finetune=finetune, finetune_train=train).check()
            assert str(e.value) == expected


@pytest.mark.parametrize("value,expected", [("0", "--batch-size must be > 0, got 0"),
                                            ("0.0", "--learning-rate must be > 0, got 0.0"),
                                            ("-1", "--epochs must be > 0, got -1.0"),
                                            ("0", "--temperature must be > 0, got 0.0")])
def test_documented_messages_stay_byte_identical(value, expected):
    """docs/ERRORS.md pins these texts."""
    flag = expected.split()[0]
    with pytest.raises(PkdCacheError) as e:
        kw = {flag[2:].replace("-", "_"): (int if flag == "--batch-size" else float)(value)}
        if flag == "--temperature":
            DistillConfig(store="s", output_dir="o", **kw).check()
        else:
            TrainConfig(**kw).check()
    assert str(e.value) == expected


# --- the command line, in this process (typer's CliRunner on the same app) -------------------------------------------

def invoke(*args):
    from typer.testing import CliRunner

    from pkd_cache.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"PKD_CACHE_DEBUG": ""})
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def _options(command: str) -> dict[str, tuple[str, bool]]:
    """The command's numeric options: flag -> (config field, is_int)."""
    common = {"--batch-size": ("batch_size", True), "--epochs": ("epochs", False),
              "--learning-rate": ("learning_rate", False), "--weight-decay": ("weight_decay", False),
              "--warmup-ratio": ("warmup_ratio", False), "--seed": ("seed", True), "--max-steps": ("max_steps", True),
              "--logging-steps": ("logging_steps", True), "--max-seq-length": ("max_seq_length", True)}
    return {
        "distill": {**common, "--student-layers": ("student_layers", True), "--alpha": ("alpha", False),
                    "--beta": ("beta", False), "--temperature": ("temperature", False),
                    "--chunk-size": ("chunk_size", True), "--max-examples": ("max_examples", True),
                    "--save-steps": ("save_steps", True),
                    "--per-device-train-batch-size": ("per_device_train_batch_size", True),
                    "--gradient-accumulation-steps": ("gradient_accumulation_steps", True),
                    "--max-grad-norm": ("max_grad_norm", False),
                    "--per-device-eval-batch-size": ("per_device_eval_batch_size", True),
                    "--dataloader-num-workers": ("dataloader_num_workers", True)},
        "finetune": {**common, "--max-train-samples": ("max_train_samples", True),
                     "--max-eval-samples": ("max_eval_samples", True), "--max-grad-norm": ("max_grad_norm", False)},
        "dump": {"--max-seq-length": ("max_seq_length", True), "--batch-size": ("batch_size", True),
                 "--chunk-size": ("chunk_size", True), "--sort-window": ("sort_window", True),
                 "--finetune-epochs": ("epochs", False), "--finetune-learning-rate": ("learning_rate", False),
                 "--seed": ("seed", True), "--max-examples": ("max_examples", True)},
        "eval": {"--max-seq-length": ("max_seq_length", True), "--batch-size": ("batch_size", True),
                 "--max-examples": ("max_examples", True)},
    }[command]


def _base_args(command: str, tmp: Path) -> list:
    missing = tmp / "no-such-thing"  # the first thing after the checks fails on it: proof the checks passed
    return {"distill": ["distill", "--store", missing, "--output-dir", tmp / "out"],
            "finetune": ["finetune", "--model", missing, "--task", "sst2", "--output-dir", tmp / "out"],
            "dump": ["dump", "--teacher", missing, "--task", "sst2", "--out", tmp / "out.zarr", "--data-dir", missing],
            "eval": ["eval", "--model", missing, "--task", "sst2"]}[command]


@pytest.mark.parametrize("command", ["distill", "finetune", "dump", "eval"])
def test_cli_numeric_options_over_bad_values(command, tmp_path):
    for flag, (name, is_int) in _options(command).items():
        for value in BAD_FLOATS if not is_int else BAD_INTS + ["nan"]:
            r = invoke(*_base_args(command, tmp_path), flag, value)
            assert r.exit_code == 2, (flag, value, r.exit_code, r.stderr)
            assert "Traceback" not in r.stderr and "internal error" not in r.stderr
            if is_int and value == "nan":  # not an integer: click's own usage error, naming the flag
                assert flag in r.stderr, r.stderr
                continue
            v = float(value)
            errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, (flag, value, r.stderr)
            if math.isfinite(v) and LEGAL[name](v):  # legal: refused later, for the missing model/store only
                assert "no-such-thing" in errors[0], (flag, value, errors[0])
            else:
                assert errors[0].startswith(f"error: {flag} must be "), (flag, value, errors[0])
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.zarr").exists()  # nothing written


@pytest.mark.parametrize("grid,flag", [("learning_rate=1e-3,nan", "--learning-rate"), ("epochs=inf", "--epochs"),
                                       ("paper_beta=nan", "--beta"), ("alpha=0.5,-0.5", "--alpha"),
                                       ("temperature=0", "--temperature"), ("warmup_ratio=1", "--warmup-ratio")])
def test_sweep_grid_values_are_checked_before_training(grid, flag, tmp_path, store_path):
    out = tmp_path / "sweep"
    r = invoke("sweep", "--store", store_path, "--output-dir", out, "--grid", grid, "--max-steps", "1")
    assert r.exit_code == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {flag} must be "), r.stderr
    assert not out.exists() or not any(out.rglob("*.safetensors"))


@pytest.mark.slow
def test_legal_edge_values_train_normally(tmp_path, store_path, backbone_dir):
    """alpha=0, beta=0, weight_decay=0, warmup_ratio=0, logging_steps=0, save_steps=0, seed=0, max_steps=-1 (and
    alpha=1 with a patient loss) are settings, not mistakes: a finished, finite student."""
    for i, extra in enumerate((["--alpha", "0", "--beta", "0", "--weight-decay", "0", "--warmup-ratio", "0",
                                "--logging-steps", "0", "--save-steps", "0", "--seed", "0", "--max-steps", "-1"],
                               ["--alpha", "1", "--beta", "0.5", "--logging-steps", "1", "--max-steps", "3"])):
        out = tmp_path / f"s{i}"
        r = invoke("distill", "--store", store_path, "--output-dir", out, "--student-layers", "2", "--student-init",
                   backbone_dir, "--epochs", "1", "--batch-size", "32", "--learning-rate", "1e-3", *extra)
        assert r.exit_code == 0, r.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["alpha"] == float(extra[1]) and math.isfinite(metrics["beta"])
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())


# --- --device -------------------------------------------------------------------------------------------------------

def _unusable_devices() -> list[str]:
    devices = ["gpu", "cuda:x", "cpu:1", "meta", f"cuda:{torch.cuda.device_count() + 7}"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("command", ["distill", "dump", "eval", "bench-student"])
def test_unusable_device_is_one_line_before_any_work(command, tmp_path, monkeypatch):
    import transformers

    def no_loading(*a, **k):  # the device is checked before any model is loaded
        raise AssertionError("a model was loaded before --device was checked")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_loading)
    base = {"bench-student": ["bench-student", "--model", tmp_path / "no-such-thing"]}.get(command) \
        or _base_args(command, tmp_path)
    for device in _unusable_devices():
        r = invoke(*base, "--device", device)
        assert r.exit_code == 2, (device, r.stderr)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, (device, r.stderr)
        assert errors[0].startswith((f"error: --device {device}", f"error: --device '{device}'")), errors
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.zarr").exists()


def test_resolve_device_refuses_too():
    from pkd_cache.training import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PkdCacheError, match="--device 'gpu' is not a device name"):
        resolve_device("gpu")
