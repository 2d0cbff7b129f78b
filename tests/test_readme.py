"""The README opens with the two set-up commands, and CI runs exactly the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())
    main_job, tests = commands[0], commands[1]
    assert "torch==2.13.0" in main_job and "gradwise train digits-cnn" in main_job
    assert "pytest" in tests
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    assert ci_lines[-1] == tests
