"""Batch sizes count as the Hugging Face Trainer counts them: the global batch is per-device x ranks x accumulation
steps (config.resolve_batch); `--batch-size` is the global batch itself, and a pair that disagrees is one line."""
import json

import pytest
from pkd_cache.testing import cli_in_process, show

from pkd_cache.config import resolve_batch
from pkd_cache.errors import PkdCacheError


@pytest.mark.parametrize("batch, per_device, steps, world, want", [
    (None, None, None, 1, (32, None, 1)),  # the paper's default
    (None, None, None, 4, (32, None, 1)),  # --batch-size alone (or its default) is global: 8 per rank
    (64, None, None, 2, (64, None, 1)),
    (15, None, 2, 2, (15, 4, 2)),  # shares 8 and 7, each in forwards of at most 4
    (None, 16, None, 1, (16, None, 1)),  # one process, one forward: as without the option
    (None, 16, None, 4, (64, 16, 1)),  # per device means per device: the trap this fixes
    (None, 8, 4, 2, (64, 8, 4)),
    (64, 16, None, 4, (64, 16, 1)),  # agreeing: fine
    (64, 8, 2, 4, (64, 8, 2)),
])
def test_the_global_batch_is_per_device_times_ranks_times_steps(batch, per_device, steps, world, want):
    assert resolve_batch(batch, per_device, steps, world) == want


@pytest.mark.parametrize("batch, per_device, steps, world, says", [
    (64, 16, None, 2, "--batch-size 64 (the global batch) disagrees with --per-device-train-batch-size 16 x 2 "
                      "rank(s) x --gradient-accumulation-steps 1 = 32; give only one of the two (or add "
                      "--gradient-accumulation-steps 2)"),
    (64, 16, 1, 2, "= 32; give only one of the two"),
    (50, 16, None, 1, "= 16; give only one of the two"),
])
def test_a_pair_that_disagrees_is_refused(batch, per_device, steps, world, says):
    with pytest.raises(PkdCacheError) as e:
        resolve_batch(batch, per_device, steps, world)
    assert says in str(e.value) and ("(or add" in str(e.value)) == ("(or add" in says)


def test_distill_records_how_its_batch_was_made(store_path, backbone_dir, tmp_path):
    """One process, 4 per forward, 3 accumulation steps: a global batch of 12, so 160 examples take 14 steps; the
    metrics say so, and keep the options as given."""
    out = tmp_path / "student"
    p = cli_in_process("distill", "--store", store_path, "--student-init", backbone_dir, "--student-layers", "2",
                       "--epochs", "1", "--per_device_train_batch_size", "4", "--gradient-accumulation-steps", "3",
                       "--output-dir", out)
    assert p.returncode == 0, show(p)
    m = json.loads((out / "metrics.json").read_text())
    assert m["batch"] == {"global": 12, "ranks": 1, "per_device": 4, "gradient_accumulation_steps": 3}
    assert m["steps"] == 14  # ceil(160 / 12)
    assert m["config"]["per_device_train_batch_size"] == 4 and m["config"]["train"]["batch_size"] is None
    assert "batch 12 (4 per device x 1 rank(s) x 3 accumulation step(s))" in " ".join(p.stderr.split())
