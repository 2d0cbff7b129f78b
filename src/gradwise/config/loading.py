"""Reading recipes: YAML, ``key.path=value`` overrides, validation, one-line errors.

Overrides are applied to the raw mapping before validation, so an override is
checked exactly like the file. Every validation problem becomes one
:class:`~gradwise.errors.ConfigError` line naming the field path, the value
given and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gradwise.config.kinds import DATA, MODELS, OPTIMIZERS
from gradwise.config.schema import RunConfig
from gradwise.errors import ConfigError


def _parse_scalar(text: str) -> Any:
    """Parse an override value as YAML ('0.1' → float, '[16, 32]' → list, 'none' → None)."""
    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" as a string; users mean a number. Text that reads as no finite number
        # ('inf', 'nan', '1e400') stays text, so a float field refuses it as typed and a str field keeps it.
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.path=value`` applied (YAML-typed values)."""
    result: dict[str, Any] = deep_copy(raw)
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        path, _, text = item.partition("=")
        parsed.append((path.strip(), _parse_scalar(text)))
    # A component switch first: it drops the previous component's own settings, and the overrides that
    # follow are the new component's (a key it does not take is then an error, whatever the order given).
    parsed.sort(key=lambda item: not _is_component_name(item[0]))
    for path, value in parsed:
        set_path(result, path, value)
    return result


def _is_component_name(path: str) -> bool:
    return path in {f"{kind.path}.name" for kind in (MODELS, DATA, OPTIMIZERS)}


def _switch_component(raw: dict[str, Any], kind_path: str, name: Any) -> None:
    """``raw[kind_path]`` keeps only what component ``name`` takes, when ``name`` replaces another component.

    Switching ``optim.name=sgd`` on a saved Adam run must not fail on the Adam run's ``betas``: those were
    the previous component's settings, not the user's words for the new one.
    """
    kind = {k.path: k for k in (MODELS, DATA, OPTIMIZERS)}[kind_path]
    section = raw.get(kind_path)
    if not isinstance(section, dict) or not isinstance(name, str) or name not in kind.names():
        return
    if section.get("name", kind.default) == name:
        return
    own = kind.get(name).section.model_fields
    raw[kind_path] = {k: v for k, v in section.items() if k in own}


def set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``path`` 'a.b.c', creating sections as needed."""
    keys = path.split(".")
    if not all(keys):
        raise ConfigError(f"override {path!r}: empty key in the path")
    if len(keys) == 2 and keys[1] == "name" and _is_component_name(path):
        _switch_component(raw, keys[0], value)
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {path}: {'.'.join(keys[: depth + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [deep_copy(v) for v in raw]
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a recipe or run file (UTF-8 YAML) into a mapping.

    Raises:
        ConfigError: One line naming the file: it is missing, a directory or unreadable, binary (a NUL
            byte) or not UTF-8 (the byte offset and line), not valid YAML (the line), or not a mapping.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"recipe {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe {path}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"recipe {path}: cannot read ({exc.strerror or exc})") from None
    text = _decode(path, data)
    try:
        raw = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character; PyYAML reports its position in the text
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"recipe {path} line {line}: unacceptable character #x{exc.character:04x} "
            "(control characters are not allowed in YAML)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"recipe {path}{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"recipe {path}: nested too deeply to be a config") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    return raw


def _decode(path: Path, data: bytes) -> str:
    """``data`` as UTF-8 text, or a ConfigError naming the file and the first offending byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"recipe {path}: UTF-16 text, not UTF-8; save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text file holds one: an executable, an archive, UTF-16
        raise ConfigError(f"recipe {path}: a binary file, not YAML text (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"recipe {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            "save it as UTF-8"
        ) from None


def validate(raw: dict[str, Any], source: str = "config", *, base_dir: Path | None = None) -> RunConfig:
    """Validate a raw mapping into a RunConfig, or raise one ConfigError line.

    Relative data paths that a section anchors (``text_files``' ``paths`` and ``tokenizer``) are made
    absolute against ``base_dir``, by default the working directory, as ``data.path`` is read: an
    override typed on the command line means what it says whichever recipe it changes (a bundled
    recipe's own directory is inside the package), and the saved config resumes from anywhere.
    """
    try:
        return RunConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_error(exc)}") from None


# The fields of the model, data and optim sections before each component owned its section (run
# directories up to gradwise 0.1's first format). Their config.yaml holds every one of them, most of which
# the chosen component never read; reading such a file drops those (they did nothing), nothing else.
_FLAT_FIELDS = {
    "model": {
        "path", "pooling", "init_from", "n_layer", "n_head", "n_embd", "gradient_checkpointing", "compile",
        "hidden", "activation", "dropout", "norm", "channels", "kernel_size", "keep_layers",
    },
    "data": {
        "path", "format", "features", "target", "val_fraction", "test_fraction", "standardize", "limit",
        "n_samples", "noise_std", "text", "topics", "max_length", "bucket_by_length", "seq_len", "vocab_size",
        "corpus_chars",
    },
    "optim": {
        "lr", "momentum", "momentum_form", "betas", "eps", "alpha", "adaptive_beta", "lr_multipliers",
        "no_decay_bias_norm", "extra",
    },
}  # fmt: skip


def read_saved_config(path: Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` as a mapping, written by this version or an earlier one.

    An earlier version wrote every field of the one flat model/data/optim section; the fields the
    chosen component does not read are dropped here (they were ignored when that run trained).
    """
    raw = read_yaml(path)
    for kind in (MODELS, DATA, OPTIMIZERS):
        section = raw.get(kind.path)
        if not isinstance(section, dict):
            continue
        name = section.get("name", kind.default)
        if not isinstance(name, str) or name not in kind.names():
            continue  # validation says what is wrong
        own = kind.get(name).section.model_fields
        section = {k: v for k, v in section.items() if k in own or k not in _FLAT_FIELDS[kind.path]}
        if kind.path == "model" and name == "cnn" and isinstance(section.get("hidden"), list):
            section["hidden"] = section["hidden"][:1]  # the CNN only ever read the first width
        if kind.path == "data" and "standardize_target" in own and "standardize" in section:
            # Every field is saved, so a section with `standardize` but no `standardize_target` was saved before
            # regression targets were standardized: that run trained on the raw target, and rebuilding it with
            # today's default would map its outputs back a second time. (Only a regression's: a classifier's
            # config stays as written, so `train RECIPE resume=RUN` still matches it.)
            if "standardize_target" not in section and _recorded_kind(path.parent) in (None, "regression"):
                section["standardize_target"] = False
        raw[kind.path] = section
    return raw


def _recorded_kind(run_dir: Path) -> str | None:
    """The task kind a run directory's ``data_info.json`` records, or None when there is none to read."""
    import json

    try:
        kind = json.loads((run_dir / "data_info.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def load_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe, apply overrides and validate it."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate(raw, source=str(path))


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (enough to reproduce the run)."""
    data = cfg.model_dump(mode="json", exclude={"resume"})
    # libyaml's emitter when PyYAML has it: the pure-Python one was 40% of a short run's fixed cost.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=False)


# --------------------------------------------------------------------------- messages

_HINTS = {
    "optim.weight_decay": "weight decay lives in regularize.weight_decay (decoupled) or regularize.l2 (coupled)",
    "epochs": "the training budget lives in stop.epochs / stop.max_steps",
    "lr": "the learning rate lives in optim.lr",
    "batch_size": "the batch size lives in batch.size",
}


def hint_for(path: str, key: str) -> str | None:
    """Where a key that is often misplaced really lives, if it is one of those."""
    return _HINTS.get(path) or _HINTS.get(key)


def describe_error(exc: ValidationError, root: type[BaseModel] = RunConfig) -> str:
    """Turn the first pydantic error into one line: path, value given, what is allowed.

    ``root`` is the schema that was validated (a run config unless told otherwise).
    """
    errors = exc.errors()
    err = errors[0]
    loc = _field_path(err["loc"])
    path = ".".join(loc) or "(top level)"
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        parent = _section_at(loc[:-1], root)
        allowed = ", ".join(parent.model_fields) if parent is not None else "?"
        hint = _HINTS.get(path) or _HINTS.get(loc[-1])
        tail = f" ({hint})" if hint else ""
        return f"{path}: unknown key; allowed keys: {allowed}{tail}"
    if kind == "value_error":
        return str(err.get("msg", "")).removeprefix("Value error, ")
    # A union (e.g. an integer or 'full') fails once per member: list them all.
    same = [e for e in errors if _field_path(e["loc"]) == loc]
    allowed = " or ".join(dict.fromkeys(_allowed(e) for e in same))
    return f"{path}: got {given!r}; expected {allowed}"


def _field_path(loc: tuple[Any, ...]) -> list[str]:
    # pydantic adds union-member tags such as 'constrained-int' or "literal['full']".
    return [str(p) for p in loc if not re.search(r"[-\[(]", str(p)) and str(p) not in ("int", "float", "str")]


def _allowed(err: Any) -> str:
    if err["type"] == "literal_error":
        return "one of " + str(err.get("ctx", {}).get("expected", ""))
    return str(err["msg"]).lower().removeprefix("input should be ").removeprefix("value error, ")


def _section_at(loc: list[str], root: type[BaseModel]) -> type[BaseModel] | None:
    """The schema section at ``loc``, stepping through optional sections, dict values and list items."""
    ann: Any = root
    for key in loc:
        ann = _unwrap_optional(ann)
        if _is_model(ann):
            field = ann.model_fields.get(key)
            if field is None:
                return None
            ann = field.annotation
        else:  # a dict key (a variant's name) or a list index: step into the container's value type
            args = get_args(ann)
            if not args:
                return None
            ann = args[-1]
    ann = _unwrap_optional(ann)
    return ann if _is_model(ann) else None


def _unwrap_optional(ann: Any) -> Any:
    if get_origin(ann) in (Union, UnionType):
        members = [a for a in get_args(ann) if a is not type(None)]
        return next((a for a in members if _is_model(a)), members[0])
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and get_origin(ann) is None and issubclass(ann, BaseModel)
