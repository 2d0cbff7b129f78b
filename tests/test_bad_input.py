"""Bad input through the real command: one line naming what and where, exit status 2, no traceback, no run.

Each case runs ``python -m gradwise`` in a fresh process, as a user would; the config error comes
before any training, so each is one interpreter start and an import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def _file(name: str, content: bytes) -> Callable[[Path], list[str]]:
    def make(tmp_path: Path) -> list[str]:
        (tmp_path / name).write_bytes(content)
        return ["train", name]

    return make


def _directory(tmp_path: Path) -> list[str]:
    (tmp_path / "recipe.yaml").mkdir()
    return ["train", "recipe.yaml"]


def _executable(tmp_path: Path) -> list[str]:
    return ["train", "/bin/ls" if Path("/bin/ls").is_file() else str(Path(sys.executable).resolve())]


def _resume_latin1(tmp_path: Path) -> list[str]:
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "config.yaml").write_bytes("description: résumé\n".encode("latin-1"))
    return ["resume", str(run)]


CASES = {
    "override-1e400": (lambda _: ["train", "digits-mlp", "optim.lr=1e400"], "optim.lr: got '1e400'; expected a finite"),
    "override-nan": (lambda _: ["train", "digits-mlp", "optim.lr=nan"], "optim.lr: got 'nan'; expected a finite"),
    "override-.inf-in-list": (
        lambda _: ["train", "digits-mlp", "optim.betas=[0.9, .inf]"],
        "optim.betas.1: got inf; expected a finite number",
    ),
    "yaml-.nan-optional": (
        _file("r.yaml", b"schedule: {name: exponential, gamma: .nan}\n"),
        "r.yaml: schedule.gamma: got nan; expected a finite number",
    ),
    "yaml-.inf-dict-value": (
        _file("r.yaml", b"optim:\n  lr_multipliers: {'head.*': .inf}\n"),
        "r.yaml: optim.lr_multipliers.head.*: got inf; expected a finite number",
    ),
    "variant-.inf": (
        _file("r.yaml", b"variants:\n  hot: {optim.lr: .inf}\n"),
        "r.yaml variants.hot: optim.lr: got inf; expected a finite number",
    ),
    "latin-1": (
        _file("latin.yaml", "description: café\n".encode("latin-1")),
        "recipe latin.yaml: not UTF-8 text (byte 0xe9 at offset 16, line 1)",
    ),
    "nul-bytes": (_file("nul.yaml", b"optim: {}\n\x00\x00"), "recipe nul.yaml: a binary file, not YAML text"),
    "executable": (_executable, "a binary file, not YAML text (NUL byte at offset"),
    "directory": (_directory, "recipe recipe.yaml: is a directory, not a YAML file"),
    "not-a-mapping": (_file("list.yaml", b"- optim\n- lr\n"), "recipe list.yaml: expected a mapping of sections"),
    "resume-latin-1": (_resume_latin1, "old/config.yaml: not UTF-8 text (byte 0xe9 at offset"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_status_2_and_no_run(tmp_path: Path, case: str):
    make, expected = CASES[case]
    argv = make(tmp_path)
    runs = tmp_path / "runs"
    before = sorted(runs.rglob("*")) if runs.exists() else []
    done = subprocess.run(
        [sys.executable, "-m", "gradwise", *argv, f"out_dir={runs}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith(f"gradwise {argv[0]}: error: ")
    assert expected in lines[0]
    assert done.stdout == ""
    assert (sorted(runs.rglob("*")) if runs.exists() else []) == before  # no run directory, no lock, no file
