"""Output folders: --overwrite replaces only a pkd-cache output of the same kind, never an input or a folder
holding one; the old output goes only once the new one is complete; one run writes an output at a time."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import pkd_cache
from pkd_cache.commands import paths
from pkd_cache.commands.output_lock import OutputLock, lock_path
from pkd_cache.testing import cli_env, cli_in_process, show, tree_digest


def distill_args(store, out, init, *extra):
    return ["distill", "--store", store, "--output-dir", out, "--student-layers", "2", "--student-init", init,
            "--epochs", "1", "--batch-size", "16", "--learning-rate", "1e-3", "--logging-steps", "0", *extra]


def _cfg(store, out, init, **kw):
    train = pkd_cache.TrainConfig(epochs=1, learning_rate=kw.pop("lr", 1e-3), batch_size=16, seed=kw.pop("seed", 0),
                                  logging_steps=0, save_steps=kw.pop("save_steps", 0))
    return pkd_cache.DistillConfig(store=str(store), output_dir=str(out), student_init=str(init), student_layers=2,
                                   train=train, **kw)


@pytest.fixture(scope="module")
def student(tmp_path_factory, store_path, backbone_dir):
    """A finished student; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("students") / "student"
    pkd_cache.distill(_cfg(store_path, out, backbone_dir))
    return out


def copy_of(folder, tmp_path, name="student"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def no_leftovers(final):
    """Nothing written aside stays beside the folder."""
    assert not [p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")]


def refused(p, *says):
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, show(p)
    for s in says:
        assert s in p.stderr, show(p)


def test_a_student_records_what_wrote_it(student):
    marker = json.loads((student / paths.MARKER).read_text())
    assert marker["kind"] == "student" and marker["command"] == "distill" and marker["complete"] is True
    assert "model.safetensors" in marker["files"] and "metrics.json" in marker["files"]
    assert paths.output_kind(student) == "student"


def test_overwrite_onto_the_store_it_reads_is_refused(tmp_path, store_path, backbone_dir):
    store = copy_of(store_path, tmp_path, "x.zarr")
    before = tree_digest(store)
    p = cli_in_process(*distill_args(store, store, backbone_dir, "--overwrite"))
    refused(p, f"--output-dir {store} is the store")
    assert tree_digest(store) == before


def test_overwrite_onto_a_project_folder_is_refused(tmp_path, store_path, teacher_dir, backbone_dir):
    project = tmp_path / "project"
    project.mkdir()
    store, teacher = copy_of(store_path, project, "sst2.zarr"), copy_of(teacher_dir, project, "teacher")
    (project / "thesis.tex").write_text("\\chapter{Results}")
    before = tree_digest(project)
    p = cli_in_process(*distill_args(store, project, backbone_dir, "--overwrite"))
    refused(p, f"--output-dir {project} contains the store")
    p = cli_in_process(*distill_args(store_path, project, backbone_dir, "--overwrite"))  # another store: still no
    refused(p, "already exists and is not empty", "holds sst2.zarr and 2 more, which pkd-cache did not write")
    p = cli_in_process(*distill_args(store_path, teacher, backbone_dir, "--overwrite"))  # a model, not pkd-cache's
    refused(p, "holds config.json", "pkd-cache did not write")
    assert tree_digest(project) == before


@pytest.mark.parametrize("inside", ["sub", "."])
def test_the_output_is_never_inside_or_above_an_input(tmp_path, store_path, backbone_dir, inside):
    store = copy_of(store_path, tmp_path, "x.zarr")
    before = tree_digest(store)
    out = store / "student" if inside == "sub" else tmp_path
    p = cli_in_process(*distill_args(store, out, backbone_dir))
    refused(p, "inside the store" if inside == "sub" else "contains the store")
    init = copy_of(backbone_dir, tmp_path, "init")  # the student's own init, named as its output
    p = cli_in_process(*distill_args(store_path, init, init, "--overwrite"))
    refused(p, "is --student-init")
    assert tree_digest(store) == before and not (store / "student").exists()


def test_a_student_with_a_file_pkd_cache_did_not_write_is_refused(tmp_path, student, store_path, backbone_dir):
    out = copy_of(student, tmp_path)
    (out / "notes.md").write_text("keep me")
    before = tree_digest(out)
    p = cli_in_process(*distill_args(store_path, out, backbone_dir, "--overwrite"))
    refused(p, "holds notes.md, which pkd-cache did not write", "choose another --output-dir")
    assert tree_digest(out) == before


@pytest.mark.parametrize("kind", ["teacher", "store", "sweep"])
def test_another_kind_of_pkd_cache_output_is_not_replaced(tmp_path, store_path, backbone_dir, kind):
    out = tmp_path / "out"
    out.mkdir()
    marker = {"teacher": "pkd_cache_finetune.json", "store": "zarr.json", "sweep": "sweep.json"}[kind]
    (out / marker).write_text("{}")
    p = cli_in_process(*distill_args(store_path, out, backbone_dir, "--overwrite"))
    refused(p, f"is a pkd-cache {paths.KIND_NAMES[kind]}, not a student folder")
    assert [f.name for f in out.iterdir()] == [marker]


def test_overwrite_replaces_a_student_once_the_new_one_is_complete(tmp_path, student, store_path, backbone_dir):
    out = copy_of(student, tmp_path)
    old = json.loads((out / "metrics.json").read_text())
    p = cli_in_process(*distill_args(store_path, out, backbone_dir, "--overwrite", "--seed", "7"))
    assert p.returncode == 0, show(p)
    new = json.loads((out / "metrics.json").read_text())
    assert new["config"]["train"]["seed"] == 7 and old["config"]["train"]["seed"] == 0
    assert json.loads((out / paths.MARKER).read_text())["complete"] is True
    no_leftovers(out)


def test_an_old_student_without_a_marker_is_still_recognised(tmp_path, student, store_path, backbone_dir):
    out = copy_of(student, tmp_path)
    (out / paths.MARKER).unlink()  # as written by an earlier pkd-cache
    pkd_cache.distill(_cfg(store_path, out, backbone_dir, overwrite=True, seed=3))
    assert json.loads((out / "metrics.json").read_text())["config"]["train"]["seed"] == 3


def test_a_failing_run_keeps_the_old_student(tmp_path, student, store_path, backbone_dir, monkeypatch):
    distill_module = sys.modules["pkd_cache.commands.distill"]  # `pkd_cache.commands.distill` is the function
    out = copy_of(student, tmp_path)
    before = tree_digest(out)

    def fail(*a, **k):
        raise RuntimeError("training blew up")

    monkeypatch.setattr(distill_module, "train_many", fail)
    with pytest.raises(RuntimeError):
        pkd_cache.distill(_cfg(store_path, out, backbone_dir, overwrite=True))
    assert tree_digest(out) == before
    no_leftovers(out)


def test_a_replacement_killed_midway_resumes_beside_the_old_student(tmp_path, student, store_path, backbone_dir,
                                                                     monkeypatch):
    from pkd_cache import checkpoint

    out = copy_of(student, tmp_path)
    before = tree_digest(out)
    real = checkpoint.save

    def save_then_die(*a, **k):
        real(*a, **k)
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        pkd_cache.distill(_cfg(store_path, out, backbone_dir, overwrite=True, seed=4, save_steps=2))
    monkeypatch.setattr(checkpoint, "save", real)
    assert tree_digest(out) == before  # the old student is whole while the new one is unfinished
    assert paths.resume_dir(str(out)) == paths.aside(out, paths.NEW)
    m = pkd_cache.distill(_cfg(store_path, out, backbone_dir, overwrite=True, seed=4, save_steps=2, resume=True))
    assert json.loads((out / "metrics.json").read_text())["config"]["train"]["seed"] == 4 and m["steps"] > 2
    assert not (out / "checkpoint").exists()
    no_leftovers(out)


def test_a_folder_being_written_is_refused(tmp_path, store_path, backbone_dir):
    out = tmp_path / "student"
    with OutputLock(out, str(out)):
        assert lock_path(out).is_file()
        p = cli_in_process(*distill_args(store_path, out, backbone_dir))
        refused(p, "is being written by another pkd-cache run", f"pid {os.getpid()}")
    assert not out.exists() or not any(out.iterdir())
    assert not lock_path(out).exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_distills_into_one_folder_at_once_never_both_succeed(tmp_path, store_path, backbone_dir):
    out = tmp_path / "student"
    procs = [subprocess.Popen([sys.executable, "-m", "pkd_cache", *map(str, distill_args(
        store_path, out, backbone_dir, "--seed", str(seed)))], env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "being written by another pkd-cache run" in err or "already exists and is not empty" in err, err
    winner = next(seed for (code, _), seed in zip(results, (1, 2)) if code == 0)
    assert json.loads((out / "metrics.json").read_text())["config"]["train"]["seed"] == winner


def test_a_swap_cut_between_its_renames_is_finished_or_undone(tmp_path):
    final = tmp_path / "student"
    old, new = paths.aside(final, paths.OLD), paths.aside(final, paths.NEW)
    for complete, survivor in ((True, "new"), (False, "old")):
        for folder, name in ((old, "old"), (new, "new")):
            folder.mkdir()
            (folder / "which").write_text(name)
        (new / paths.MARKER).write_text(json.dumps({"kind": "student", "complete": complete}))
        paths.recover(final)
        assert (final / "which").read_text() == survivor and not old.exists()
        shutil.rmtree(final)
        shutil.rmtree(new, ignore_errors=True)


def finetune_args(model, data, out, *extra):
    return ["finetune", "--model", model, "--task", "sst2", "--data-dir", data, "--output-dir", out,
            "--max-steps", "1", "--max-seq-length", "24", *extra]


def test_finetune_replaces_only_a_teacher_it_wrote(tmp_path, backbone_dir, data_dir, student):
    teacher = tmp_path / "teacher"
    p = cli_in_process(*finetune_args(backbone_dir, data_dir, teacher))
    assert p.returncode == 0 and paths.output_kind(teacher) == "teacher", show(p)
    no_leftovers(teacher)
    p = cli_in_process(*finetune_args(backbone_dir, data_dir, teacher, "--overwrite", "--seed", "3"))
    assert p.returncode == 0 and json.loads((teacher / "metrics.json").read_text())["config"]["train"]["seed"] == 3
    no_leftovers(teacher)
    for out, says in ((copy_of(student, tmp_path), "is a pkd-cache student folder, not a fine-tuned teacher"),
                      (copy_of(backbone_dir, tmp_path, "backbone"), "is --model")):
        before = tree_digest(out)
        model = out if says == "is --model" else backbone_dir
        refused(cli_in_process(*finetune_args(model, data_dir, out, "--overwrite")), says)
        assert tree_digest(out) == before


def test_finetune_that_fails_leaves_no_trace(tmp_path, backbone_dir, data_dir, monkeypatch):
    ft = importlib.import_module("pkd_cache.commands.finetune")  # the module: `pkd_cache.commands.finetune` is the function

    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ft, "train", fail)
    out = tmp_path / "teacher"
    with pytest.raises(RuntimeError):
        pkd_cache.finetune(pkd_cache.FinetuneConfig(model=str(backbone_dir), task="sst2", output_dir=str(out),
                                                    data_dir=str(data_dir), max_seq_length=24))
    assert not out.exists()
    no_leftovers(out)


@pytest.mark.kill
def test_finetune_stopped_by_sigterm_leaves_no_trace(tmp_path, backbone_dir, data_dir):
    """A scheduler's stop (SIGTERM) mid-training: one line, and nothing that looks like a teacher, half-trained or
    otherwise (a dump fine-tuning its teacher used to leave an empty `<out>.teacher/`)."""
    import signal

    from pkd_cache.testing import wait_until

    out = tmp_path / "teacher"
    proc = subprocess.Popen([sys.executable, "-m", "pkd_cache", "finetune", "--model", str(backbone_dir), "--task",
                             "sst2", "--data-dir", str(data_dir), "--output-dir", str(out), "--max-seq-length", "24",
                             "--epochs", "1000"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: any((p / "model.safetensors").exists() for p in tmp_path.glob(".teacher.*")),
               "the first checkpoint written aside", proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err[-2000:]
    assert list(tmp_path.iterdir()) == []  # no teacher, nothing aside, no lock


def test_eval_writes_its_results_only_beside_a_model_pkd_cache_wrote(tmp_path, student, teacher_dir, data_dir):
    mine, other = copy_of(student, tmp_path), copy_of(teacher_dir, tmp_path, "downloaded")
    (other / "eval_results.json").write_text('{"from": "another tool"}')
    for model in (mine, other):
        p = cli_in_process("eval", "--model", model, "--task", "sst2", "--data-dir", data_dir)
        assert p.returncode == 0 and "validation_accuracy" in p.stdout, show(p)
    assert "validation_accuracy" in json.loads((mine / "eval_results.json").read_text())
    assert json.loads((other / "eval_results.json").read_text()) == {"from": "another tool"}
    assert not list(mine.glob(".*.tmp"))


def test_a_sweep_writes_only_into_an_empty_folder_or_its_own(tmp_path, store_path, backbone_dir):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    args = ["sweep", "--store", store_path, "--student-init", backbone_dir, "--student-layers", "2", "--epochs", "1",
            "--max-steps", "1", "--grid", "alpha=0.5"]
    refused(cli_in_process(*args, "--output-dir", folder), "not a folder pkd-cache wrote, not a sweep's folder")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
    store = copy_of(store_path, tmp_path / "with-store", "s.zarr")
    before = tree_digest(store)
    for out, says in ((store, "is the store"), (store.parent, "contains the store")):
        refused(cli_in_process(*[store if a == store_path else a for a in args], "--output-dir", out), says)
    assert tree_digest(store) == before and sorted(p.name for p in store.parent.iterdir()) == ["s.zarr"]
    runs = tmp_path / "runs"
    (runs / "alpha=0.5").mkdir(parents=True)
    (runs / "alpha=0.5" / "mine.txt").write_text("x")  # a run folder pkd-cache did not write: never replaced
    (runs / "sweep.json").write_text("{}")
    refused(cli_in_process(*args, "--output-dir", runs), "holds mine.txt", "pkd-cache did not write")
    assert (runs / "alpha=0.5" / "mine.txt").read_text() == "x"
