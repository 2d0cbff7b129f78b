"""The recipes bundled inside the package: list, find by name, copy to edit."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gradwise.config.loading import read_yaml
from gradwise.errors import ConfigError

# Compression recipes are read by `gradwise compress RUN_DIR NAME`; their names start with this.
COMPRESS_PREFIX = "compress-"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    path: Path

    @property
    def command(self) -> str:
        """The subcommand that reads this recipe."""
        return "compress" if self.name.startswith(COMPRESS_PREFIX) else "train"


def recipes_dir() -> Path:
    return Path(str(resources.files("gradwise") / "recipes"))


def list_recipes() -> list[Recipe]:
    """Every bundled recipe, sorted by name, with the one-line description it declares."""
    found = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        raw = read_yaml(path)
        found.append(Recipe(path.stem, str(raw.get("description", "")).strip(), path))
    return found


def find_recipe(arg: str) -> Path:
    """``arg`` as a file path, else (a bare name, no suffix or slash) as the name of a bundled recipe.

    Only where the file is is decided here; :func:`gradwise.config.read_yaml` reads it (and refuses a
    binary, non-UTF-8 or non-mapping file with one line naming it).

    Raises:
        ConfigError: ``arg`` is a directory, cannot be looked at (a name too long, a parent without
            permission), or names neither a file nor a bundled recipe.
    """
    if not arg.strip() or "\0" in arg:
        raise ConfigError(f"recipe {arg!r}: not a file name")
    path = Path(arg)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:
        raise ConfigError(f"recipe {arg}: cannot read ({exc.strerror or exc})") from None
    if exists:
        if is_dir:
            raise ConfigError(f"recipe {arg}: is a directory, not a YAML file")
        return path
    bundled = recipes_dir() / f"{arg}.yaml"
    if "/" not in arg and not path.suffix and bundled.exists():
        return bundled
    if path.suffix or "/" in arg:  # a path with a typo must not silently fall back to a bundled recipe
        raise ConfigError(f"recipe {arg}: file not found")
    names = ", ".join(r.name for r in list_recipes())
    raise ConfigError(f"recipe {arg}: no such file, and no bundled recipe of that name (bundled: {names})")


def copy_recipe(name: str, dest: Path) -> Path:
    """Copy bundled recipe ``name`` to ``dest`` (a file, or a directory to copy into); never overwrites."""
    source = recipes_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not source.exists():
        names = ", ".join(r.name for r in list_recipes())
        raise ConfigError(f"recipes copy: no bundled recipe {name!r} (bundled: {names})")
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise ConfigError(f"recipes copy: {target} exists; not overwriting it")
    shutil.copyfile(source, target)
    return target
