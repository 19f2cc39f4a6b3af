"""`pkd-cache bench-student`: sizes and speed of a student next to its teacher."""
import json

from pkd_cache.testing import make_bert
from pkd_cache.testing import cli_in_process, show


def test_student_against_teacher(tmp_path, teacher_dir):
    student = make_bert(tmp_path / "student", layers=1, head=True)
    p = cli_in_process("bench-student", "--model", student, "--teacher", teacher_dir, "--seq-length", "16",
                       "--batch-size", "8", "--iterations", "5", "--json")
    assert p.returncode == 0, show(p)
    teacher, stud = json.loads(p.stdout)
    assert (teacher["layers"], stud["layers"]) == (4, 1)
    assert stud["parameters"] < teacher["parameters"] and 0 < stud["params_ratio"] < 1
    assert stud["latency_ms"] > 0 and stud["throughput"] > 0 and stud["speedup_throughput"] > 0
    p = cli_in_process("bench-student", "--model", student, "--seq-length", "16", "--iterations", "3")
    assert p.returncode == 0 and "student" in p.stdout, show(p)


def test_bad_input(tmp_path):
    p = cli_in_process("bench-student", "--model", tmp_path / "missing")
    assert p.returncode == 2 and "cannot load" in p.stderr and len(p.stderr.strip().splitlines()) == 1, show(p)
    p = cli_in_process("bench-student", "--model", tmp_path, "--batch-size", "0")
    assert p.returncode == 2 and "--batch-size must be > 0" in p.stderr, show(p)
