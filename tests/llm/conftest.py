"""Tiny causal LMs of three architectures, made once per test session (random weights, a trained tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import make_model_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal-lms")
    first = make_model_dir("llama", root / "llama")
    dirs = {"llama": first}
    from tiny import save_tiny

    for kind in ("qwen2", "gpt2"):
        directory = root / kind
        directory.mkdir()
        for file in first.iterdir():  # the same tokenizer for every architecture
            if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
                (directory / file.name).write_bytes(file.read_bytes())
        dirs[kind] = save_tiny(kind, directory)
    return dirs
