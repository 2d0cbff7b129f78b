"""The README opens with the two set-up commands, and CI runs exactly the second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())
    main_job, tests = commands[0], commands[1]
    assert "torch==2.13.0" in main_job and "gradwise train digits-cnn" in main_job
    assert "pytest" in tests
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    assert ci_lines[-1] == tests


def python_api_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### The Python API") :]
    return re.search(r"```python\n(.+?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*looks like a row id")
def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_api_example(), "README.md (The Python API)", "exec"), namespace)
    run, predicted = namespace["run"], namespace["run"].predict(namespace["new"], proba=True)
    assert run.dir == Path("runs") / "penguins" and run.summary["final"]["test_accuracy"] > 0.9
    assert list(predicted["prediction"]) == ["Gentoo", "Adelie"]  # a heavy long-flippered Biscoe bird, a small one
    assert namespace["model"] is namespace["same"].model and not namespace["model"].training
