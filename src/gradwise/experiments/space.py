"""Search spaces for sweeps: which config paths vary, and over what.

A space file maps config paths to a spec (nested sections work too)::

    optim.name: [sgd, momentum, adam]          # a list of choices (any YAML values)
    optim.lr: loguniform(1e-4, 1e-1)           # float, uniform in log space
    model.dropout: uniform(0.0, 0.5)           # float; uniform(low, high, step) for a grid of floats
    model.hidden: [[64], [128, 64]]            # choices may be lists or mappings
    batch.size: intlog(16, 256)                # integer, uniform in log space
    schedule.step_size: int(100, 500, 100)     # integer; the optional third argument is the step

Ranges include both ends. ``description:`` at the top is a free-text note.
Every entry is checked against the recipe when the space is loaded, so a
typo in a path, a range outside what the config allows, or an empty choice
list is a one-line :class:`~gradwise.errors.ConfigError` naming the entry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from pydantic import ValidationError

from gradwise.config import RunConfig, deep_copy, describe_error, set_path
from gradwise.errors import ConfigError
from gradwise.store.files import read_text

Kind = Literal["choice", "uniform", "loguniform", "int", "intlog"]
RANGE_KINDS: tuple[str, ...] = ("uniform", "loguniform", "int", "intlog")
# Paths the sweep itself decides: where trials go, and the one metric the whole study optimizes.
RESERVED = ("name", "description", "out_dir", "resume", "variants", "stop.monitor", "stop.mode")
_SPEC = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class Param:
    """One searched config path.

    ``choices`` holds the values as Optuna stores them: plain scalars, or JSON
    text when any choice is a list or mapping (``encoded``); :meth:`decode`
    turns a stored value back into the config value.
    """

    path: str
    kind: Kind
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    encoded: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution this entry samples from."""
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.kind in ("int", "intlog"):
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.kind == "intlog", step=int(self.step or 1)
            )
        return optuna.distributions.FloatDistribution(
            self.low, self.high, log=self.kind == "loguniform", step=self.step
        )

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """Sample this entry for ``trial`` (a value as Optuna stores it)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, self.choices)
        if self.kind in ("int", "intlog"):
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.kind == "intlog"
            )
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.kind == "loguniform")

    def decode(self, value: Any) -> Any:
        """The config value for a value Optuna sampled."""
        return json.loads(value) if self.encoded else value

    def values(self) -> list[Any]:
        """Config values that bound this entry: every choice, or both ends of the range."""
        if self.kind == "choice":
            return [self.decode(c) for c in self.choices]
        if self.kind in ("int", "intlog"):
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        """Whether the config value ``value`` is a point of this entry (e.g. the recipe's own value)."""
        if self.kind == "choice":
            return any(_same(value, v) for v in self.values())
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        if self.kind in ("int", "intlog") and not float(value).is_integer():
            return False
        steps = (value - self.low) / (self.step or 1) if self.kind in ("int", "intlog") or self.step else 0.0
        return abs(steps - round(steps)) < 1e-9

    def encode(self, value: Any) -> Any:
        """The value as Optuna stores it (inverse of :meth:`decode`)."""
        return _json(value) if self.encoded else value

    def describe(self) -> str:
        """The spec as written in a space file (normalized)."""
        if self.kind == "choice":
            return _json([self.decode(c) for c in self.choices])
        numbers = [self.low, self.high] + ([self.step] if self.step is not None else [])
        shown = [str(int(n)) if self.kind in ("int", "intlog") else repr(float(n)) for n in numbers]
        return f"{self.kind}({', '.join(shown)})"


@dataclass(frozen=True)
class Space:
    """The searched entries of a space file, in file order."""

    source: str
    params: tuple[Param, ...]

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def suggest(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """Sample every entry for ``trial``; returns path → value as Optuna stores it."""
        return {p.path: p.suggest(trial) for p in self.params}

    def apply(self, raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """A copy of the raw recipe with the sampled ``values`` (path → stored value) set."""
        result: dict[str, Any] = deep_copy(raw)
        for param in self.params:
            if param.path in values:
                set_path(result, param.path, deep_copy(param.decode(values[param.path])))
        return result

    def decoded(self, values: dict[str, Any]) -> dict[str, Any]:
        """Path → config value for stored values (what tables and best.yaml show)."""
        by_path = {p.path: p for p in self.params}
        return {k: by_path[k].decode(v) if k in by_path else v for k, v in values.items()}

    def grid(self) -> dict[str, list[Any]]:
        """Path → choices for a grid search; every entry must be a list of choices."""
        ranges = [p for p in self.params if p.kind != "choice"]
        if ranges:
            p = ranges[0]
            raise ConfigError(
                f"{self.source}: {p.path}: the grid sampler needs a list of choices, got {p.describe()}; "
                "list the values or use --sampler tpe/random"
            )
        return {p.path: list(p.choices) for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(choices) for choices in self.grid().values())

    def describe(self) -> dict[str, str]:
        """Path → normalized spec: two spaces are the same search when these are equal."""
        return {p.path: p.describe() for p in self.params}


def spaces_dir() -> Path:
    return Path(str(resources.files("gradwise") / "recipes" / "spaces"))


def find_space(arg: str) -> Path:
    """``arg`` as a file path, else (a bare name) as a space bundled in ``gradwise/recipes/spaces``."""
    path = Path(arg)
    if path.is_file():
        return path
    bundled = spaces_dir() / f"{arg}.yaml"
    if "/" not in arg and not path.suffix and bundled.is_file():
        return bundled
    if path.suffix or "/" in arg:  # a path with a typo must not silently fall back to a bundled space
        raise ConfigError(f"space {arg}: file not found")
    names = ", ".join(sorted(p.stem for p in spaces_dir().glob("*.yaml"))) or "none"
    raise ConfigError(f"space {arg}: no such file, and no bundled space of that name (bundled: {names})")


def load_space(path: Path, base_raw: dict[str, Any]) -> Space:
    """Read and check a space file against the raw recipe it will vary.

    Args:
        path: The space YAML file.
        base_raw: The raw recipe mapping (overrides applied) the sweep starts from.

    Returns:
        The parsed :class:`Space`.

    Raises:
        ConfigError: The file is unreadable or empty, or an entry names an unknown or
            reserved config path, has an empty or repeated choice list, a bad range
            (low >= high, a log range with low <= 0, a non-integer bound of an
            integer range) or an unparsable spec, or a value it can take does not
            validate with the recipe. The message names the file and the entry.
    """
    source = str(path)
    try:
        raw = yaml.safe_load(read_text(Path(path), what="space file"))
    except FileNotFoundError:
        raise ConfigError(f"space {source}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"space {source}{where}: {getattr(exc, 'problem', None) or 'invalid YAML'}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"space {source}: expected a mapping of config paths to choices or ranges")
    raw.pop("description", None)
    entries = _flatten(raw)
    if not entries:
        raise ConfigError(f"space {source}: no entries; map config paths to choices or ranges, e.g. optim.lr: ...")
    params = tuple(_parse(source, path_, spec) for path_, spec in entries.items())
    _check_against_recipe(source, params, base_raw)
    return Space(source=source, params=params)


# --------------------------------------------------------------------------- parsing


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:  # a nested section: its keys continue the path
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _parse(source: str, path: str, spec: Any) -> Param:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"{source}: {path}: {message}")

    if path in RESERVED or path.startswith("variants."):
        why = "the objective" if path.startswith("stop.") else "set by the sweep"
        raise fail(f"cannot be searched ({why}); searchable paths are the recipe's other settings")
    if isinstance(spec, list):
        return _choices(path, spec, fail)
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None or match.group(1) not in RANGE_KINDS:
        raise fail(
            f"got {spec!r}; expected a list of choices or uniform(low, high), loguniform(low, high), "
            "int(low, high), intlog(low, high)"
        )
    kind, args_text = match.group(1), match.group(2)
    try:
        args = [_number(a) for a in args_text.split(",")]
    except ValueError:
        raise fail(f"{kind} arguments must be numbers, got {args_text.strip()!r}") from None
    max_args = 3 if kind in ("uniform", "int") else 2
    if not 2 <= len(args) <= max_args:
        forms = f"{kind}(low, high)" + (f" or {kind}(low, high, step)" if max_args == 3 else "")
        raise fail(f"{kind} takes {forms}, got {len(args)} arguments")
    low, high = args[0], args[1]
    step = args[2] if len(args) == 3 else None
    if kind in ("int", "intlog") and not all(float(a).is_integer() for a in args):
        raise fail(f"{kind} bounds and step must be integers, got {args_text.strip()}")
    if low >= high:
        raise fail(f"{kind} low must be < high (got {_show(low)}, {_show(high)})")
    if kind in ("loguniform", "intlog") and low <= 0:
        raise fail(f"{kind} low must be > 0 (got {_show(low)})")
    if step is not None:
        if step <= 0:
            raise fail(f"{kind} step must be > 0 (got {_show(step)})")
        span = (high - low) / step
        if abs(span - round(span)) > 1e-9:
            raise fail(f"{kind} high - low must be a whole number of steps (got {_show(high - low)} / {_show(step)})")
    return Param(path=path, kind=kind, low=low, high=high, step=step)  # type: ignore[arg-type]


def _choices(path: str, spec: list[Any], fail: Any) -> Param:
    if not spec:
        raise fail("empty choice list; give at least one value")
    values = [_number_like(v) for v in spec]
    for i, value in enumerate(values):
        if any(_same(value, other) for other in values[:i]):
            raise fail(f"choice {_json(value)} is listed twice")
    # Optuna stores categorical choices as scalars; lists and mappings travel as JSON text.
    encoded = any(isinstance(v, list | dict) for v in values)
    choices = tuple(_json(v) for v in values) if encoded else tuple(values)
    return Param(path=path, kind="choice", choices=choices, encoded=encoded)


def _number(text: str) -> float | int:
    value = yaml.safe_load(text)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(text)
    number = float(value)  # YAML 1.1 reads 1e-4 as text
    if not math.isfinite(number):
        raise ValueError(text)
    return int(number) if isinstance(value, int) else number


def _number_like(value: Any) -> Any:
    # YAML 1.1 reads "1e-3" as a string; in a space file it always means the number.
    if isinstance(value, str) and _YAML11_FLOAT.match(value):
        return float(value)
    if isinstance(value, list):
        return [_number_like(v) for v in value]
    if isinstance(value, dict):
        return {k: _number_like(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (_is_number(a) and _is_number(b) and a == b)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _show(value: float) -> str:
    return f"{value:g}"


# --------------------------------------------------------------------------- checking against the recipe


def _check_against_recipe(source: str, params: tuple[Param, ...], base_raw: dict[str, Any]) -> None:
    """Validate the recipe with each value an entry can take, one entry at a time.

    An error at the entry's own path (unknown key, out of range, wrong type) is always
    the space's fault. A rule between fields (``schedule.gamma`` is required for
    ``exponential``) may be met by another entry of the space, so it only fails the
    space when the space has no other entry; otherwise that combination fails as a trial.
    """
    try:
        RunConfig.model_validate(base_raw)
    except ValidationError as exc:
        raise ConfigError(f"recipe: {describe_error(exc)}") from None
    for param in params:
        for value in param.values():
            raw = deep_copy(base_raw)
            try:
                set_path(raw, param.path, deep_copy(value))
            except ConfigError:
                raise ConfigError(f"{source}: {param.path}: not a config path (a parent of it is a value)") from None
            try:
                RunConfig.model_validate(raw)
            except ValidationError as exc:
                message = describe_error(exc)
                keys = param.path.split(".")
                at_entry = any(message.startswith(".".join(keys[:n]) + ":") for n in range(1, len(keys) + 1))
                if at_entry:
                    raise ConfigError(f"{source}: {message}") from None
                if len(params) == 1:
                    raise ConfigError(
                        f"{source}: {param.path}: {_json(value)} does not fit the recipe: {message}"
                    ) from None
