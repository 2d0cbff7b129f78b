"""The kinds of registered component and the settings every component of a kind shares.

A component's own section extends one of these bases with its fields and narrows ``name`` to
its one name; its capabilities are class attributes the run config checks combinations with
(``takes``/``batch_format``: which batches a model reads and a data source makes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import field_validator, model_validator

from gradwise.config.base import Fraction, NonNegFloat, PositiveFloat, PositiveInt, finite_values
from gradwise.config.registry import ComponentSection, Registry

# The batch formats a data source yields and a model takes.
#   features:     float (N, F) rows (images flattened; the model reshapes them)
#   tokens:       int64 (N, T) token ids padded with the pad id, trimmed per batch to its longest row
#   interactions: a mapping of int64 id columns ({"user", "item"} …; see gradwise.data.movielens)
BatchFormat = Literal["features", "tokens", "interactions"]


class ModelSection(ComponentSection):
    """Settings every model has.

    ``init_from`` starts from the best weights of one of our own runs (same body, new head);
    ``compile``: ``model`` (or true) runs the model's forward through ``torch.compile``; ``step`` compiles
    the training step (the micro-batch loss with its backward, and the optimizer update; see
    :mod:`gradwise.train.compiled`).

    Class attributes: ``takes`` is the batch format the model reads; ``body`` says the model
    has a transformer body that ``finetune.*`` can freeze, unfreeze and decay layer-wise.
    """

    init_from: Path | None = None
    compile: bool | Literal["model", "step"] = False

    takes: ClassVar[tuple[str, ...]] = ("features",)
    body: ClassVar[bool] = False

    def pretrained_dir(self) -> Path | None:
        """The local directory of a pretrained model (it holds the tokenizer too); None for one built from scratch."""
        return None


class DataSection(ComponentSection):
    """Settings every data source has: the split fractions and a row limit.

    Class attribute ``yields`` is the batch format the source makes (a section whose format
    depends on its settings overrides :meth:`batch_format`).
    """

    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15
    limit: PositiveInt | None = None

    yields: ClassVar[str] = "features"

    def batch_format(self) -> str:
        return self.yields

    @model_validator(mode="after")
    def _fractions(self) -> DataSection:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1 to leave training data")
        return self


class OptimSection(ComponentSection):
    """Settings every optimizer has.

    ``lr_multipliers`` maps glob patterns over parameter names (``head.*``) to a factor on
    ``lr``; ``extra`` passes further keyword arguments to the torch.optim class;
    ``no_decay_bias_norm`` exempts biases and norm weights from weight decay (which lives in
    ``regularize``). ``sparse`` is the optimizer of the parameters whose gradients are sparse
    (``nn.Embedding(sparse=True)``), which the dense optimizers cannot take: SparseAdam (with
    this section's ``lr``), Adagrad or plain SGD.
    """

    lr: PositiveFloat = 1e-3
    lr_multipliers: dict[str, NonNegFloat] = {}
    no_decay_bias_norm: bool = True
    extra: dict[str, Any] = {}
    sparse: Literal["sparse_adam", "adagrad", "sgd"] = "sparse_adam"

    @field_validator("extra")
    @classmethod
    def _finite_extra(cls, extra: dict[str, Any]) -> dict[str, Any]:
        return finite_values(extra, "optim.extra")


MODELS: Registry[ModelSection] = Registry("model", "gradwise.models", ModelSection, default="mlp")
DATA: Registry[DataSection] = Registry("data", "gradwise.data", DataSection, default="digits")
OPTIMIZERS: Registry[OptimSection] = Registry("optim", "gradwise.optimizers", OptimSection, default="adam")
