"""Failures of the machine or of a file: one stderr line naming the path, exit status 2, nothing good lost.

Every case asserts the same contract (issue 11): exit status 2, exactly one non-empty stderr line that names
the path (or the extra to install), no traceback; the last good checkpoint is kept and no temporary file or
directory is left behind; a run that never reached its first step leaves no run directory.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import gradwise.store.checkpoint as checkpoint_module
import gradwise.store.files as files_module
from gradwise.cli import main
from gradwise.store.checkpoint import read_manifest, resolve_checkpoint

# A constant schedule: the recipe's step schedule warns (one more stderr line) on runs this short.
QUICK = ["data.limit=300", "stop.epochs=1", "schedule.name=constant", "log.progress=false", "log.plots=false"]


def gradwise_process(cwd: Path, *argv: str, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gradwise", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def assert_one_line(code: int, err: str, *names: str) -> str:
    """Exit 2 and exactly one non-empty stderr line, which mentions every one of ``names``; the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), to see that a failed command left nothing behind."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def temporary_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------- 1. out_dir cannot be made


def test_out_dir_that_is_a_file_in_a_real_process(tmp_path: Path):
    (tmp_path / "taken").write_text("a file, not a directory\n")
    before = tree(tmp_path)
    done = gradwise_process(tmp_path, "train", "digits-mlp", *QUICK, "out_dir=taken")
    assert_one_line(done.returncode, done.stderr, "taken", "Not a directory")
    assert done.stderr.startswith("gradwise train: error: ")
    assert tree(tmp_path) == before
    assert (tmp_path / "taken").read_text() == "a file, not a directory\n"


@pytest.mark.parametrize("named", [False, True], ids=["timestamped", "name=x"])
def test_out_dir_under_a_file_is_one_line(tmp_path: Path, capsys, monkeypatch, named: bool):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("")
    before = tree(tmp_path)
    argv = ["train", "digits-mlp", *QUICK, "out_dir=taken/runs", *(["name=x"] if named else [])]
    code = main(argv)
    _, err = capsys.readouterr()
    assert_one_line(code, err, "taken/runs/", "Not a directory", "a file stands where a directory is needed")
    assert tree(tmp_path) == before


def _forbid_writing(directory: Path) -> tuple[str, Callable[[], object]]:
    """Make ``directory`` refuse new entries; (the reason the OS will give, how to undo it)."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        return "Permission denied", lambda: directory.chmod(0o700)
    # root ignores permission bits; an immutable directory refuses even root (needs chattr and ext4/xfs/btrfs).
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root, where permission bits are not enforced, and chattr +i is not available here")
    return "Operation not permitted", lambda: subprocess.run([chattr, "-i", str(directory)], check=True)


def test_out_dir_without_write_permission_is_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    reason, undo = _forbid_writing(locked)
    try:
        code = main(["train", "digits-mlp", *QUICK, "out_dir=locked/runs", "name=x"])
        _, err = capsys.readouterr()
        assert_one_line(code, err, "locked/runs", reason, "choose another out_dir or fix the permissions")
        assert list(locked.iterdir()) == []
    finally:
        undo()
    assert tree(tmp_path) == {"locked"}


# --------------------------------------------------------------------------- 2. the disk fills during a checkpoint


def _ignore_sigxfsz() -> None:
    # Past RLIMIT_FSIZE the kernel sends SIGXFSZ (default: kill the process); ignored, write() fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.slow
def test_file_size_limit_during_a_checkpoint_keeps_the_last_one(tmp_path: Path, capsys, monkeypatch):
    """A real EFBIG from the kernel while writing the second checkpoint of a real ``gradwise train`` process.

    RLIMIT_FSIZE caps every file alike, and every checkpoint of a run writes files of the same sizes, so a
    limit set at exec would stop the first checkpoint as surely as a later one. The limit is therefore
    lowered on the running process (prlimit) once its first checkpoint is committed: below the weights'
    size, far above what the metrics log reaches, so the next checkpoint is the write that fails.
    """
    argv = ["train", "digits-mlp", "data.limit=300", "stop.epochs=200", "schedule.name=constant"]
    argv += ["checkpoint.min_interval_s=0", "log.progress=false", "log.plots=false", "name=r"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwise", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigxfsz,
    )
    root = tmp_path / "runs" / "r" / "checkpoints"
    deadline = time.monotonic() + 90
    try:
        while not (root / "manifest.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before its first checkpoint was seen"
        first = read_manifest(root)
        assert first is not None
        weights = root / first.tags["last"] / "model.safetensors"
        limit = weights.stat().st_size // 2
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    manifest = read_manifest(root)
    assert manifest is not None
    kept = manifest.steps["last"]
    assert kept >= first.steps["last"]
    assert (tmp_path / "runs" / "r" / "metrics.jsonl").stat().st_size < limit  # the failure is the checkpoint's
    line = assert_one_line(proc.returncode, err, "runs/r/checkpoints", "File too large")
    assert f"checkpoint 'last' (step {kept}) is kept" in line
    assert temporary_leftovers(root) == []
    resolve_checkpoint(tmp_path / "runs" / "r", "last")  # still verifies against the manifest

    # Without the limit the run continues from the kept checkpoint and completes.
    monkeypatch.chdir(tmp_path)
    assert main(["resume", "runs/r", f"stop.epochs={kept // 7 + 2}"]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["status"] == "completed"
    lines = (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"kind": "train"' in line]
    assert steps == list(range(1, summary["steps"] + 1))  # every step once: resumed at the kept one
    assert temporary_leftovers(root) == []
    assert {p.name for p in root.iterdir()} <= {"manifest.json", "last", "best", *read_manifest(root).tags.values()}


class _OsWithAFullDisk:
    """``os`` for gradwise.store.files, whose ``write`` fails as on a full disk once ``full`` is set."""

    full = False

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)


def test_full_disk_at_the_commit_keeps_the_last_checkpoint(tmp_path: Path, capsys, monkeypatch):
    """ENOSPC writing the manifest (the commit point) of the second checkpoint: the first stays committed."""
    monkeypatch.chdir(tmp_path)
    fake_os = _OsWithAFullDisk()
    monkeypatch.setattr(files_module, "os", fake_os)
    real_commit = checkpoint_module.commit

    def commit_then_fill_the_disk(*args, **kwargs):
        manifest = real_commit(*args, **kwargs)
        fake_os.full = True
        return manifest

    monkeypatch.setattr(checkpoint_module, "commit", commit_then_fill_the_disk)
    code = main(["train", "digits-mlp", *QUICK, "stop.epochs=3", "checkpoint.min_interval_s=0", "name=r"])
    _, err = capsys.readouterr()
    root = tmp_path / "runs" / "r" / "checkpoints"
    kept = read_manifest(root).steps["last"]
    line = assert_one_line(code, err, "runs/r/checkpoints/manifest.json", "No space left on device")
    assert f"checkpoint 'last' (step {kept}) is kept" in line
    assert temporary_leftovers(root) == []
    resolve_checkpoint(tmp_path / "runs" / "r", "last")

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["resume", "runs/r"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["status"] == "completed"
    assert {p.name for p in root.iterdir()} <= {"manifest.json", "last", "best", *read_manifest(root).tags.values()}


# --------------------------------------------------------------------------- 3. a tracker without its library


def _without_tensorboard(monkeypatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name.split(".")[0] == "tensorboard" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_tensorboard_without_its_library_is_refused_before_any_directory(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _without_tensorboard(monkeypatch)
    code = main(["train", "digits-mlp", *QUICK, "log.tensorboard=true", "name=tb"])
    _, err = capsys.readouterr()
    assert_one_line(code, err, "log.tensorboard", "pip install 'gradwise[tracking]'")
    assert tree(tmp_path) == set()


def test_branch_with_tensorboard_without_its_library_makes_no_directory(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "digits-mlp", *QUICK, "name=r"]) == 0
    capsys.readouterr()
    _without_tensorboard(monkeypatch)
    code = main(["resume", "runs/r", "--from-checkpoint", "last", "optim.lr=0.01", "log.tensorboard=true"])
    _, err = capsys.readouterr()
    assert_one_line(code, err, "log.tensorboard", "pip install 'gradwise[tracking]'")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


# --------------------------------------------------------------------------- 4. a data failure before step 1


def test_a_run_failing_on_its_data_leaves_no_directory_and_the_name_is_free(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = "".join(f"{i % 7},{(i * 3) % 11},{i % 2}\n" for i in range(120))
    (tmp_path / "table.csv").write_text("a,b,label\n" + rows)
    data = ["data.name=file", "data.path=table.csv", "stop.epochs=1", "schedule.name=constant", "log.plots=false"]
    code = main(["train", "digits-mlp", *data, "data.target=lbl", "log.progress=false", "name=x"])
    _, err = capsys.readouterr()
    assert_one_line(code, err, "table.csv", "'lbl'")
    assert not (tmp_path / "runs" / "x").exists()
    code = main(["train", "digits-mlp", *data, "data.target=label", "log.progress=false", "name=x"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "x" / "summary.json").read_text())["status"] == "completed"


# --------------------------------------------------------------------------- 5. run files that are not UTF-8


@pytest.fixture
def finished_run(tmp_path: Path, capsys, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "digits-mlp", *QUICK, "name=r"]) == 0
    capsys.readouterr()
    return tmp_path / "runs" / "r"


@pytest.mark.parametrize("branch", [False, True], ids=["resume", "resume --from-checkpoint"])
def test_resume_with_a_latin1_config_is_one_line(finished_run: Path, capsys, branch: bool):
    config = finished_run / "config.yaml"
    config.write_bytes(config.read_bytes().replace(b"seed: 0", b"seed: 0  # caf\xe9"))
    before = tree(finished_run.parent)
    argv = ["resume", "runs/r", *(["--from-checkpoint", "last", "optim.lr=0.01"] if branch else [])]
    code = main(argv)
    _, err = capsys.readouterr()
    assert_one_line(code, err, "runs/r/config.yaml", "UTF-8")
    assert tree(finished_run.parent) == before


def test_eval_with_a_latin1_config_is_one_line(finished_run: Path, capsys):
    config = finished_run / "config.yaml"
    config.write_bytes(config.read_bytes().replace(b"seed: 0", b"seed: 0  # caf\xe9"))
    code = main(["eval", "runs/r"])
    _, err = capsys.readouterr()
    assert_one_line(code, err, "runs/r/config.yaml", "UTF-8")


JUNK = b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80 binary"


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_binary_manifest_is_one_line(finished_run: Path, capsys, command: str):
    (finished_run / "checkpoints" / "manifest.json").write_bytes(JUNK)
    code = main([command, "runs/r"])
    _, err = capsys.readouterr()
    assert_one_line(code, err, "runs/r/checkpoints/manifest.json", "UTF-8")
    assert (finished_run / "checkpoints" / "manifest.json").read_bytes() == JUNK


def test_a_binary_summary_is_one_line(finished_run: Path, capsys):
    # eval reads the checkpoint, not the summary; compare (and compress) read the summary.
    (finished_run / "summary.json").write_bytes(JUNK)
    code = main(["compare", "runs/r", "-o", "cmp"])
    _, err = capsys.readouterr()
    assert_one_line(code, err, "runs/r/summary.json", "UTF-8")
