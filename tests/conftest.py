"""Suite-wide settings."""

from __future__ import annotations

import os

import torch

# Under pytest-xdist each worker is one process per core: two intra-op threads per worker would
# oversubscribe the cores and make every test several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Models and tokenizers load from local directories only; a hub lookup would be a bug.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
