"""A run against its operator's mistakes and its machine's faults: two starts on one workdir (the
lock), torn lines in ``metrics.jsonl``, and writes that fail (a full disk) while saving a
checkpoint or the metrics: by fault injection, and (as root) on a real small tmpfs."""

import errno
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

import train
from jaxtricks.lm import cli, plots, training
from jaxtricks.lm.workdir import RunLock, WorkdirLocked, write_errno
from tests.test_training import STEPS  # the tiny run of test_training.py
from tests.test_training import _args as args


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def checkpoint_dir_entries(workdir):
    return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir())


def assert_same_losses(workdir, reference):
    got = losses(workdir)
    assert [step for step, _ in got] == list(range(1, STEPS + 1)), "a step logged twice or skipped"
    assert got == losses(reference)  # bit for bit, step for step


def one_error_line(err):
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- the lock


def test_a_held_lock_refuses_a_second_start_and_is_released(tmp_path, capsys):
    workdir = tmp_path / "run"
    with RunLock(workdir) as lock:
        held = json.loads(lock.path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(WorkdirLocked) as refused:
            RunLock(workdir).acquire()
        assert (f"in use by process {os.getpid()} on host {socket.gethostname()} since "
                f"{held['since']}") in str(refused.value)
        assert lock.path.exists()
    assert not workdir.exists()  # made by the lock, nothing else written: removed with it
    (workdir / "checkpoints").mkdir(parents=True)
    with RunLock(workdir) as lock:
        pass
    assert not lock.path.exists() and (workdir / "checkpoints").is_dir()


def _dead_pid():
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_stale_lock_is_taken_over_and_one_from_another_host_never(tmp_path, capsys):
    path = tmp_path / "run.lock"
    pid = _dead_pid()
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then"}))
    with RunLock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {pid} on host {socket.gethostname()} since then" in (
        capsys.readouterr().out)
    foreign = json.dumps({"pid": os.getpid(), "host": "elsewhere.example", "since": "then"})
    path.write_text(foreign)
    with pytest.raises(WorkdirLocked) as refused:
        RunLock(tmp_path).acquire()
    assert "on host elsewhere.example since then" in str(refused.value)
    assert "never taken over from another host" in str(refused.value)
    assert f"remove the lock: rm {path}" in str(refused.value)
    assert path.read_text() == foreign
    path.write_text("{\"pid\": 12")  # torn: cannot tell who holds it
    with pytest.raises(WorkdirLocked, match="cannot be read; once you are sure"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_starts_racing_for_one_workdir_exactly_one_wins(tmp_path, stale, capsys):
    if stale:
        (tmp_path / "run.lock").write_text(json.dumps(
            {"pid": _dead_pid(), "host": socket.gethostname(), "since": "then", "token": "old"}))
    barrier, won, refused = threading.Barrier(8), [], []

    def start():
        lock = RunLock(tmp_path)
        barrier.wait()
        try:
            won.append(lock.acquire())
        except WorkdirLocked as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, refused
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == won[0].token
    won[0].release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


# --------------------------------------------------------------------------- torn metrics lines


def test_metrics_log_drops_torn_and_garbage_lines_and_says_how_many(tmp_path, capsys):
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(
        [*good[:2], "\x00\x00garbage", *good[2:], '["no step"]', '{"step": 6, "loss": 1.2']))
    log = training.MetricsLog(tmp_path, resume_step=4)
    log.write(5, {"loss": 0.5})
    log.close()
    assert "dropped 3 line(s) that do not parse" in capsys.readouterr().out
    assert losses(tmp_path) == [(s, 1.0 / s) for s in range(1, 5)] + [(5, 0.5)]


def test_write_errno_finds_the_error_wrapped_or_quoted():
    assert write_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert write_errno(OSError(errno.ENOENT, "No such file or directory")) is None
    quoted = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": Failed to write 954 "
                        "bytes to file 22: No space left on device [os_error_code='28']")
    assert write_errno(quoted) == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as wrapped:
        assert write_errno(wrapped) == errno.EROFS
    assert write_errno(RuntimeError("Event loop is closed")) is None


# --------------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run: the trajectory every interrupted run must follow."""
    workdir = tmp_path_factory.mktemp("reference")
    assert train.main(args(workdir, data_dir)) == 0
    return workdir


@pytest.mark.slow
def test_two_starts_on_one_workdir_one_trains_the_other_exits_2(
    tmp_path, data_dir, reference, python, capsys
):
    workdir = tmp_path / "run"
    first = python.start("train.py", *args(workdir, data_dir), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (workdir / "run.lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second started"
    second = python.run("train.py", *args(workdir, data_dir))
    assert second.returncode == 2
    assert second.stdout == ""  # it wrote nothing, not even its model line
    err = one_error_line(second.stderr)
    assert f"is in use by process {first.pid} on host {socket.gethostname()} since " in err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert not (workdir / "run.lock").exists()
    assert_same_losses(workdir, reference)
    # Resumable: the same command again finds the finished run and trains nothing more.
    assert train.main(args(workdir, data_dir)) == 0
    assert f"resumed from {workdir.absolute() / 'checkpoints' / str(STEPS)}" in (
        capsys.readouterr().out)
    # A lock left by a process that is gone (a finished child) is taken over.
    gone = python.run("-c", "import os; print(os.getpid())")
    pid = int(gone.stdout)
    (workdir / "run.lock").write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "since": "2000-01-01 00:00:00 UTC"}))
    assert train.main(args(workdir, data_dir)) == 0
    assert f"taking over the lock of process {pid}" in capsys.readouterr().out
    assert not (workdir / "run.lock").exists()
    # One from another host is never taken over: exit 2, the host named, how to remove it.
    (workdir / "run.lock").write_text(json.dumps(
        {"pid": 1, "host": "elsewhere.example", "since": "2000-01-01 00:00:00 UTC"}))
    assert train.main(args(workdir, data_dir)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "host elsewhere.example" in err and f"rm {workdir / 'run.lock'}" in err


@pytest.mark.slow
def test_torn_and_garbage_metrics_lines_resume_exactly_and_report(
    tmp_path, data_dir, reference, capsys
):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for later in (workdir / "checkpoints").iterdir():
        if int(later.name) > 100:
            shutil.rmtree(later)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 100]
    kept.insert(40, "\x07garbage{{")
    (workdir / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 101, "loss": 1.2')
    capsys.readouterr()
    with RunLock(workdir):  # a read-only command does not need the lock
        assert cli.main(["report", str(workdir)]) == 0  # the report of the damaged file works
    captured = capsys.readouterr()
    assert "100 logged steps" in captured.out
    assert "skipped 2 line(s) that are not metrics lines" in captured.err
    assert train.main(args(workdir, data_dir)) == 0
    out = capsys.readouterr().out
    assert "dropped 2 line(s) that do not parse" in out and "at step 100" in out
    assert_same_losses(workdir, reference)
    assert plots.report_series(workdir).bad_lines == ()


def _fail_checkpoint(monkeypatch, at_step, where):
    """ENOSPC from Orbax at checkpoint ``at_step``: an OSError raised by its save call after it
    has begun its temporary folder, or the error text its C++ writes give, from the wait."""
    manager = ocp.CheckpointManager
    real_save, real_wait = manager.save, manager.wait_until_finished
    failing = {"step": None}

    def save(self, step, *a, **kw):
        if step != at_step:
            return real_save(self, step, *a, **kw)
        half = Path(str(self.directory)) / f"{step}.orbax-checkpoint-tmp-1234" / "state"
        half.mkdir(parents=True)
        (half / "d").write_bytes(b"\0" * 1000)
        if where == "save":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(half / "d"))
        failing["step"] = step

    def wait_until_finished(self):
        if failing["step"] is not None:
            failing["step"] = None
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write 954 "
                             "bytes to file 22: No space left on device [os_error_code='28']")
        return real_wait(self)

    monkeypatch.setattr(manager, "save", save)
    monkeypatch.setattr(manager, "wait_until_finished", wait_until_finished)


@pytest.mark.slow
@pytest.mark.parametrize("at_step,where", [(25, "save"), (75, "save"), (75, "wait")])
def test_a_full_disk_at_a_checkpoint_exits_3_and_resumes_exactly(
    tmp_path, data_dir, reference, monkeypatch, capsys, at_step, where
):
    workdir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fail_checkpoint(patch, at_step, where)
        assert train.main(args(workdir, data_dir)) == 3
    err = one_error_line(capsys.readouterr().err)
    assert "error: cannot write " + str(workdir.absolute() / "checkpoints") in err
    assert f"No space left on device (ENOSPC) while saving the checkpoint of step {at_step}" in err
    needs = "the size of checkpoint 50" if at_step == 75 else "the state's arrays"
    assert "a checkpoint needs about" in err and needs in err
    assert "run the same command again" in err
    earlier = [str(s) for s in range(25, at_step, 25)]
    assert checkpoint_dir_entries(workdir) == earlier  # no temporary folder, earlier ones kept
    assert not (workdir / "run.lock").exists()
    assert train.main(args(workdir, data_dir)) == 0
    assert_same_losses(workdir, reference)


@pytest.mark.slow
def test_a_full_disk_while_writing_the_metrics_exits_3_and_resumes_exactly(
    tmp_path, data_dir, reference, monkeypatch, capsys
):
    real_init = training.MetricsLog.__init__

    class FullDisk:  # the metrics file, on a disk that fills up halfway through step 60's line
        def __init__(self, file):
            self.file = file

        def write(self, text):
            if text.startswith('{"step": 60,'):
                self.file.write(text[:20])
                self.file.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self._file = FullDisk(self._file)

    workdir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(training.MetricsLog, "__init__", init)
        assert train.main(args(workdir, data_dir)) == 3
    err = one_error_line(capsys.readouterr().err)
    assert (f"error: cannot write {workdir / 'metrics.jsonl'}: No space left on device (ENOSPC) "
            "while writing the metrics") in err
    assert "a checkpoint needs about" in err and "(the size of checkpoint 50)" in err
    assert checkpoint_dir_entries(workdir) == ["25", "50"]
    assert train.main(args(workdir, data_dir)) == 0
    assert "dropped 1 line(s) that do not parse" in capsys.readouterr().out  # the torn step 60
    assert_same_losses(workdir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["120k", "900k"], ids=["first", "later"])
def test_a_real_full_tmpfs_exits_3_in_one_line_and_resumes_exactly(
    tmp_path, data_dir, reference, python, size
):
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    # 900k: room for the metrics and two checkpoints of the tiny model (about 350 KB each), not
    # three; 120k: not even for the first.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        workdir = mountpoint / "run"
        done = python.run("train.py", *args(workdir, data_dir))
        assert done.returncode == 3, done.stderr[-3000:]
        err = one_error_line(done.stderr)  # none of Orbax's own tracebacks or logs
        assert "No space left on device (ENOSPC) while saving the checkpoint of step" in err
        assert "a checkpoint needs about" in err
        entries = checkpoint_dir_entries(workdir)
        assert all(e.isdigit() for e in entries), entries  # complete ones only
        assert (entries == []) == (size == "120k"), entries
        subprocess.run(["mount", "-o", "remount,size=16m", str(mountpoint)], check=True)
        done = python.run("train.py", *args(workdir, data_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        if entries:
            assert f"resumed from {workdir / 'checkpoints' / entries[-1]}" in done.stdout
        assert_same_losses(workdir, reference)
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)
