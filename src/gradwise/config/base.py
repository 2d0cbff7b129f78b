"""What every config section shares: unknown keys refused, values immutable and finite."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
PositiveInt = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable, numbers are finite.

    ``allow_inf_nan=False`` reaches every float (and int) a section declares, inside lists, tuples,
    dict values and optional or union types alike; a free-form ``Any`` value is checked by
    :func:`finite_values` where it holds numbers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def finite_values(value: Any, path: str) -> Any:
    """``value`` unchanged, or ValueError naming the first inf/NaN float inside it (lists and mappings too)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: got {value!r}; expected a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            finite_values(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            finite_values(item, f"{path}.{i}")
    return value
