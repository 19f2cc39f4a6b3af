"""Sweep run names are injective in the settings: two different grid values never share a run folder."""
import csv
import random
import struct

import pytest

from pkd_cache.config import DistillConfig
from pkd_cache.commands.sweep import SweepConfig, parse_grid, plan_runs, value_name
from pkd_cache.testing import cli_in_process, show


def plan(tmp_path, *specs):
    base = DistillConfig(store="s.zarr", output_dir=str(tmp_path / "runs"), student_init="init")
    return plan_runs(SweepConfig(base=base, grid=parse_grid(list(specs))), 32)


def test_values_that_print_alike_get_their_own_folders(tmp_path):
    runs = plan(tmp_path, "alpha=0.1,0.1000001", "temperature=5,5.0000001,10")
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) == 6
    assert len({r.config.output_dir for r in runs}) == 6
    assert "alpha=0.1_temperature=5" in names and "alpha=0.1000001_temperature=5.0000001" in names


def test_short_values_keep_their_short_names(tmp_path):
    names = [r.name for r in plan(tmp_path, "alpha=0,0.5", "learning_rate=2e-5,0.0001", "student_layers=3")]
    assert names[0] == "alpha=0_learning_rate=2e-05_student_layers=3"
    assert "alpha=0.5_learning_rate=0.0001_student_layers=3" in names


def test_formatting_is_injective_on_random_floats():
    rng = random.Random(0)
    values = [rng.uniform(0, 1) for _ in range(2000)]
    values += [struct.unpack("d", struct.pack("d", v))[0] for v in (0.1, 0.1 + 2**-56, 0.1 - 2**-56)]
    values += [x * 10.0 ** e for x in (1, 1.5, 2) for e in range(-8, 9)]
    values += [v + v * 1e-7 for v in values[:500]]  # neighbours that agree in 6 significant digits
    distinct = set(values)
    assert len({value_name(v) for v in distinct}) == len(distinct)
    assert all(float(value_name(v)) == v for v in distinct)  # the name reads back as the exact value


def test_repeats_are_dropped_by_value_as_named():
    assert parse_grid(["alpha=0.1,0.10,1e-1,0.1000001"]) == {"alpha": [0.1, 0.1000001]}
    assert len(parse_grid(["alpha=nan,nan"])["alpha"]) == 1  # nan != nan, yet one folder "alpha=nan"


def test_very_long_names_are_shortened_with_a_hash(tmp_path):
    long = ",".join(str(0.1 + k * 1e-16) for k in range(3))
    runs = plan(tmp_path, f"alpha={long}", f"temperature={','.join(str(5 + k * 1e-15) for k in range(3))}",
                f"learning_rate={','.join(str(1e-3 + k * 1e-19) for k in range(2))}",
                f"weight_decay={','.join(str(0.01 + k * 1e-18) for k in range(2))}",
                f"warmup_ratio={','.join(str(0.1 + k * 1e-17) for k in range(2))}")
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) and all(len(n) <= 120 for n in names)
    assert any(len(n) == 120 for n in names)  # some were shortened


@pytest.mark.slow
def test_a_sweep_of_close_values_trains_both_and_resumes_both(store_path, backbone_dir, tmp_path):
    out = tmp_path / "runs"
    args = ["sweep", "--store", store_path, "--student-init", backbone_dir, "--output-dir", out, "--student-layers",
            "2", "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--grid", "alpha=0.1,0.1000001"]
    p = cli_in_process(*args)
    assert p.returncode == 0, show(p)
    assert (out / "alpha=0.1").is_dir() and (out / "alpha=0.1000001").is_dir()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["alpha"]) for r in rows) == [0.1, 0.1000001]
    assert all(float(r["alpha"]) == float(r["grid_alpha"]) for r in rows)
    p = cli_in_process(*args)
    assert p.returncode == 0 and "2 already done, 0 to train" in p.stderr, show(p)
