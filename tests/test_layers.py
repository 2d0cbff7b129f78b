"""The layering of DESIGN.md holds: import-linter's contracts in pyproject.toml are kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_a_broken_layer_would_be_caught(tmp_path: Path):
    # The check can fail: the same contracts over a copy of the package with train importing report.
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "gradwise", copy / "gradwise")
    (copy / "gradwise" / "train" / "smuggled.py").write_text("from gradwise.report import plots\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).parent / "lint-imports"
    env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "gradwise.train.smuggled -> gradwise.report" in done.stdout, done.stdout[-2000:]
