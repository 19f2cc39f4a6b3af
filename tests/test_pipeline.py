"""The paper recipe end to end on tiny models: teacher, dump, four sweeps, report (Table 1 and the plot)."""
import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "pkd_paper.sh"


def test_recipe_runs_and_resumes(tmp_path, backbone_dir, data_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MAX_LEN": "24", "EPOCHS": "1",
           "TEACHER_EPOCHS": "1", "TEACHER_LR": "1e-3", "BATCH": "16", "STUDENT_LAYERS": "2",
           "FT_GRID": "learning_rate=1e-3", "KD_GRID": "alpha=0.5 temperature=5,10 learning_rate=1e-3",
           "PKD_GRID": "alpha=0.5 paper_beta=100 learning_rate=1e-3",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "study"
    p = subprocess.run(["bash", str(RECIPE), str(backbone_dir), "sst2", str(data_dir), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (out / "results.md").read_text()
    for row in ("teacher (fine-tuned)", "student: fine-tuning", "student: vanilla KD", "student: PKD-skip",
                "student: PKD-last"):
        assert row in report
    assert "Paper's ordering PKD >= vanilla KD >= fine-tuning" in report
    assert (out / "table1.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "sweeps" / "kd" / "results.csv").read_text().splitlines()) == 3  # header + 2 runs
    p = subprocess.run(["bash", str(RECIPE), str(backbone_dir), "sst2", str(data_dir), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "cache hit" in p.stderr and "0 to train" in p.stderr, p.stderr[-3000:]

    # an interrupted dump (its complete flag never written): the recipe resumes it instead of failing
    meta_path = out / "sst2.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["complete"] = False
    meta_path.write_text(json.dumps(meta))
    p = subprocess.run(["bash", str(RECIPE), str(backbone_dir), "sst2", str(data_dir), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "resumed" in p.stderr and "0 to train" in p.stderr, p.stderr[-3000:]
    assert json.loads(meta_path.read_text())["attributes"]["complete"] is True
