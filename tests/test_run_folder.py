"""Run folders: atomic creation, leftovers of killed writes, the lock against a second writer, bad --out."""

import os
import re
import signal
import subprocess
import sys

import pytest

import mechgrok as mg
from mechgrok import models
from mechgrok._io import FolderLock, FolderLocked


@pytest.fixture(scope="module")
def task():
    return mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)


def tiny(task):
    return models.transformer(task, d_model=16, n_heads=2, d_mlp=32, seed=0)


CFG = mg.TrainConfig(steps=10, lr=1e-2, eval_every=5, checkpoint_every=5)

def dead_pid():
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_folder_appears_only_when_complete(tmp_path, task, monkeypatch):
    """While the task and config are written, `out` does not exist yet: a kill then leaves no half-made run."""
    from mechgrok.tasks import Task

    out, seen = tmp_path / "r", []
    save = Task.save

    def watched(self, path):
        seen.append((out.exists(), path.parent.name))
        save(self, path)

    monkeypatch.setattr(Task, "save", watched)
    run = mg.train(tiny(task), task, CFG, out=out, progress=False)
    assert seen[0][0] is False and seen[0][1].startswith(f".r.{os.getpid()}.") and seen[0][1].endswith(".tmp")
    assert run.steps() == [0, 5, 10] and [p.name for p in tmp_path.iterdir()] == ["r"]


def test_sibling_left_by_a_killed_creation_is_deleted(tmp_path, task, caplog):
    """What a process killed mid-creation leaves (a temporary sibling with its pid) goes on the next start."""
    stale = tmp_path / f".r.{dead_pid()}.abcdefgh.tmp"
    (stale / "task").mkdir(parents=True)
    with caplog.at_level("INFO"):
        run = mg.train(tiny(task), task, CFG, out=tmp_path / "r", progress=False)
    assert run.steps() == [0, 5, 10] and [p.name for p in tmp_path.iterdir()] == ["r"]
    assert "left by an interrupted run creation" in caplog.text


def test_a_failed_creation_cleans_up_after_itself(tmp_path, task, monkeypatch):
    from mechgrok.tasks import Task

    def broken(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Task, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        mg.train(tiny(task), task, CFG, out=tmp_path / "r", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_folder_left_by_an_older_interrupted_creation_is_reused(tmp_path, task):
    """An older mechgrok killed mid-creation left only its temporary task folder: not a foreign folder."""
    out = tmp_path / "r"
    (out / ".task.abcd1234.tmp").mkdir(parents=True)
    (out / ".task.abcd1234.tmp" / "task.json").write_text("{")
    run = mg.train(tiny(task), task, CFG, out=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "history.jsonl", "task"]
    assert run.steps() == [0, 5, 10]


def test_existing_empty_folder_is_filled_in_place_and_a_killed_fill_redone(tmp_path, task, monkeypatch):
    """An existing empty folder (a working directory, a mkdtemp) is kept and filled in place; a fill
    killed before config.json (its `.lock` and `task/` left behind) is recognised and redone."""
    out = tmp_path / "r"
    out.mkdir()
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    run = mg.train(tiny(task), task, CFG, out=".", progress=False)
    assert run.steps() == [0, 5, 10] and out.stat().st_ino == inode
    other = tmp_path / "killed"
    (other / "task").mkdir(parents=True)
    (other / ".lock").write_text(f"{dead_pid()}\n")
    assert mg.train(tiny(task), task, CFG, out=other, progress=False).steps() == [0, 5, 10]
    with pytest.raises(FileExistsError, match="not a mechgrok run"):  # task/ without mechgrok's .lock: not ours
        (tmp_path / "mine" / "task").mkdir(parents=True)
        mg.train(tiny(task), task, CFG, out=tmp_path / "mine", progress=False)


def test_live_siblings_are_left_alone(tmp_path, task):
    live = tmp_path / f".r.{os.getppid()}.abcdefgh.tmp"  # the parent process is alive: its folder stays
    live.mkdir()
    mg.train(tiny(task), task, CFG, out=tmp_path / "r", progress=False)
    assert live.is_dir()


def test_leftover_temp_files_are_deleted_on_the_next_start(tmp_path, task):
    out = tmp_path / "r"
    mg.train(tiny(task), task, CFG, out=out, progress=False, stop_at=5)
    junk = [out / "checkpoints" / ".step_000010.safetensors.k2j4l1x0.tmp", out / ".history.jsonl.8dk3m2a1.tmp",
            out / ".config.json.zz9q0w1e.tmp"]
    for p in junk:
        p.write_bytes(b"half written")
    (out / "notes.txt").write_text("mine")
    run = mg.train(tiny(task), task, CFG, out=out, progress=False)
    assert not any(p.exists() for p in junk)
    assert (out / "notes.txt").read_text() == "mine" and run.steps() == [0, 5, 10]


def test_finished_run_keeps_no_lock_and_can_be_trained_again(tmp_path, task):
    out = tmp_path / "r"
    mg.train(tiny(task), task, CFG, out=out, progress=False)
    assert not (out / ".lock").exists()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    mg.train(tiny(task), task, CFG, out=out, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_held_lock_refuses_a_second_writer(tmp_path, task):
    out = tmp_path / "r"
    mg.train(tiny(task), task, CFG, out=out, progress=False, stop_at=5)
    with FolderLock(out, what="run"):
        with pytest.raises(FolderLocked, match=rf"{re.escape(str(out))} is in use: another process \(pid {os.getpid()}\) is writing "
                                               r"this run.*wait for it to finish"):
            mg.train(tiny(task), task, CFG, out=out, progress=False)
        assert mg.Run(out).steps() == [0, 5]
    assert mg.train(tiny(task), task, CFG, out=out, progress=False).steps() == [0, 5, 10]


# Another process holding RUN/.lock the way FolderLock does (flock + its pid), without importing torch.
_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_second_process_is_refused_and_a_killed_holder_taken_over(tmp_path, task, caplog):
    """While another process holds a run's lock, train is refused with the folder and the pid; once that
    process is killed its stale lock is taken over (with a log line) and the run resumes."""
    out = tmp_path / "r"
    mg.train(tiny(task), task, CFG, out=out, progress=False, stop_at=5)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=rf"{re.escape(str(out))} is in use: another process \(pid {proc.pid}\).*"
                                               rf"kill {proc.pid}"):
            mg.train(tiny(task), task, CFG, out=out, progress=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / ".lock").read_text().strip() == str(proc.pid)  # left behind by the killed process
    with caplog.at_level("WARNING"):
        run = mg.train(tiny(task), task, CFG, out=out, progress=False)
    assert f"taking over the stale lock {out / '.lock'} of pid {proc.pid}" in caplog.text
    assert run.steps() == [0, 5, 10] and not (out / ".lock").exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path, task, capsys):
    from mechgrok.cli import main

    f = tmp_path / "a_file.txt"
    f.write_text("x")
    with pytest.raises(FileExistsError, match=r"a_file.txt is a file, not a folder; choose a folder"):
        mg.train(tiny(task), task, CFG, out=f, progress=False)
    with pytest.raises(FileExistsError, match=r"inside .*a_file.txt, which is a file"):
        mg.train(tiny(task), task, CFG, out=f / "run", progress=False)
    assert main(["train", "--preset", "test", "--steps", "5", "--out", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_overwrite_swaps_the_folder_in_whole(tmp_path, task):
    out = tmp_path / "r"
    mg.train(tiny(task), task, CFG, out=out, progress=False)
    (out / "analysis").mkdir()
    (out / "analysis" / "old.json").write_text("{}")
    run = mg.train(tiny(task), task, CFG.replace(steps=5), out=out, progress=False, overwrite=True)
    assert run.steps() == [0, 5] and not (out / "analysis").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"] and not (out / ".lock").exists()


def test_bad_train_arguments(tmp_path, task):
    with pytest.raises(ValueError, match="resume must be 'last'.*or 'intact'"):
        mg.train(tiny(task), task, CFG, out=tmp_path / "r", resume="newest")
    with pytest.raises(TypeError, match="train: stop_at must be an integer"):
        mg.train(tiny(task), task, CFG, out=tmp_path / "r", stop_at=2.5)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        mg.train(tiny(task), task, {"steps": 5}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
