"""The README's Python snippet runs as written, on tiny data laid out as it names it (teacher/, glue/SST-2)."""
import re
import shutil
from pathlib import Path

import pytest

import pkd_cache

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_python_api_snippet_runs_as_written(tmp_path, backbone_dir, data_dir, monkeypatch):
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "pkd_cache.dump" in b]
    shutil.copytree(data_dir, tmp_path / "glue" / "SST-2")
    pkd_cache.finetune(pkd_cache.FinetuneConfig(  # `teacher/`, as `pkd-cache finetune` leaves it (1 step: tiny)
        model=str(backbone_dir), task="sst2", data_dir=str(data_dir), output_dir=str(tmp_path / "teacher"),
        max_seq_length=24, train=pkd_cache.TrainConfig(max_steps=1, logging_steps=0)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["metrics"]["student_layers"] == 3 and (tmp_path / "student" / "model.safetensors").is_file()
    assert pkd_cache.open_store("sst2.zarr").info()["teacher"]["num_layers"] == 4
