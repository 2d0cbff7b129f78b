"""Data: bundled datasets and user files (CSV, JSONL, Parquet, NPZ) as tensors in train/val/test splits."""

from gradwise.data.bundled import BUNDLED
from gradwise.data.load import load_dataset
from gradwise.data.readers import FORMATS
from gradwise.data.targets import MAX_AUTO_CLASSES
from gradwise.data.types import DataInfo, Dataset, Split, TaskKind

__all__ = ["BUNDLED", "FORMATS", "MAX_AUTO_CLASSES", "DataInfo", "Dataset", "Split", "TaskKind", "load_dataset"]
