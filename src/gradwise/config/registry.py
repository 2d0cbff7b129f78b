"""Components that own their config: one registry per kind (model, data source, optimizer).

A component is a pydantic section whose ``name`` field is a one-value ``Literal``, plus a builder.
The run config's ``model`` / ``data`` / ``optim`` field is validated by looking the name up here
and validating the mapping against that component's own section — a discriminated union built
from the registry at validation time, so a component registered in one module (by a package's
entry point or by :meth:`Registry.register`) needs no edit to the schema. A field another
component reads but the chosen one does not is refused with a line saying so.

Built-in and third-party components are found through the entry-point groups
``gradwise.models``, ``gradwise.data`` and ``gradwise.optimizers``; each entry point names a
:class:`Component` (or a mapping of name to Component). Entry points load lazily, by name, so
validating a config imports only the chosen components. (timm's optimizer registry lists
capabilities the same way; torchtitan's components nest their own config.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Annotated, Any, ClassVar, Generic, TypeVar, get_args

from pydantic import BeforeValidator, Field, SerializeAsAny, ValidationError, ValidationInfo

from gradwise.config.base import Section
from gradwise.errors import ConfigError

S = TypeVar("S", bound=Section)


@dataclass(frozen=True)
class Component:
    """One registered component.

    Attributes:
        section: Its config section; ``section.model_fields["name"]`` is ``Literal[<its name>]``.
        build: The builder, or ``"module:attribute"`` imported when first used (keeps validation light).
        summary: One line for listings (``gradwise components``) and error messages.
        capabilities: What the builder's caller needs to know beyond the section (an optimizer:
            ``native_decoupled_decay``, ``prepare``); the section's class attributes say the rest.
    """

    section: type[Section]
    build: Callable[..., Any] | str
    summary: str = ""
    capabilities: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return component_name(self.section)

    @property
    def description(self) -> str:
        """``summary``, or the first line of the section's docstring."""
        line = self.summary or (self.section.__doc__ or "").strip().splitlines()[0]
        return line.replace("``", "")  # docstrings are reStructuredText; a listing is plain text

    def builder(self) -> Callable[..., Any]:
        """The build function, imported on first use when given as a path."""
        if callable(self.build):
            return self.build
        module, _, attribute = self.build.partition(":")
        return getattr(importlib.import_module(module), attribute)


def component_name(section: type[Section]) -> str:
    """The one name a section's ``name: Literal[...]`` field allows."""
    names = get_args(section.model_fields["name"].annotation)
    if len(names) != 1:
        raise TypeError(f"{section.__name__}.name must be a Literal of one name, got {names}")
    return str(names[0])


@dataclass
class Registry(Generic[S]):
    """The components of one kind, keyed by name.

    Attributes:
        path: The config field the kind lives in (``model``, ``data``, ``optim``): used in messages.
        group: The entry-point group its installed components are listed under.
        base: The section every component of this kind extends (its shared fields).
        default: The name used when a mapping has no ``name``.
    """

    path: str
    group: str
    base: type[S]
    default: str
    _registered: dict[str, Component] = field(default_factory=dict)
    _entry_points: dict[str, Any] | None = None

    # ------------------------------------------------------------------ registration and lookup

    def register(self, component: Component, *, replace: bool = False) -> Component:
        """Add ``component`` (a test or a plugin module calls this); a second one of a name is refused."""
        if not issubclass(component.section, self.base):
            raise TypeError(f"{component.section.__name__} must extend {self.base.__name__}")
        name = component.name
        if not replace and (name in self._registered or name in self._installed()):
            raise ValueError(f"{self.path}.name {name!r} is registered already")
        self._registered[name] = component
        return component

    def unregister(self, name: str) -> None:
        """Remove a component added with :meth:`register` (tests clean up after themselves)."""
        self._registered.pop(name, None)

    def names(self) -> list[str]:
        """Every available name: installed entry points first, in their declared order, then registered ones."""
        return list(dict.fromkeys([*self._installed(), *self._registered]))

    def get(self, name: str) -> Component:
        """The component ``name``.

        Raises:
            ConfigError: no component of this kind has that name (the line lists the names there are).
        """
        if name in self._registered:
            return self._registered[name]
        point = self._installed().get(name)
        if point is None:
            raise ConfigError(self._unknown(name))
        loaded = point.load()
        if isinstance(loaded, Mapping):  # one entry point may name a module's table of components
            loaded = loaded.get(name)
        if not isinstance(loaded, Component) or loaded.name != name:
            raise ConfigError(f"{self.path}.name {name!r}: the entry point {point.value} is not a Component named so")
        self._registered[name] = loaded
        return loaded

    def __iter__(self) -> Iterator[Component]:
        return (self.get(name) for name in self.names())

    def _installed(self) -> dict[str, Any]:
        if self._entry_points is None:
            self._entry_points = {point.name: point for point in entry_points(group=self.group)}
        return self._entry_points

    def _unknown(self, name: Any) -> str:
        return f"{self.path}.name: got {name!r}; expected one of {', '.join(map(repr, self.names()))}"

    # ------------------------------------------------------------------ validation

    def validate(self, raw: Any, info: ValidationInfo | None = None) -> Section:
        """A mapping (or a section) validated against the section of its ``name``; ValueError with one line.

        The validation context of the run config (``info.context``: the config's ``base_dir``) reaches the section.
        """
        if isinstance(raw, self.base):
            return raw
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"{self.path}: expected a mapping of settings, got {type(raw).__name__} {raw!r}")
        name = raw.get("name", self.default)
        if not isinstance(name, str) or name not in self.names():
            raise ValueError(self._unknown(name))
        section = self.get(name).section
        try:
            return section.model_validate({**raw, "name": name}, context=info.context if info is not None else None)
        except ValidationError as exc:
            raise ValueError(self._describe(exc, name)) from None

    def _describe(self, exc: ValidationError, name: str) -> str:
        from gradwise.config.loading import describe_error  # loading imports the schema, which imports us

        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden" and len(loc) == 1:
            key = loc[0]
            own = ", ".join(k for k in self.get(name).section.model_fields if k != "name")
            readers = [c.name for c in self if key in c.section.model_fields]
            if readers:
                return (
                    f"{self.path}.{key} does not apply to {self.path}.name {name!r} (it is read by "
                    f"{', '.join(readers)}); {name!r} takes: {own or '(no settings)'}"
                )
            from gradwise.config.loading import hint_for

            hint = hint_for(f"{self.path}.{key}", key)
            tail = f" ({hint})" if hint else ""
            return f"{self.path}.{key}: unknown key; {self.path}.name {name!r} takes: {own or '(no settings)'}{tail}"
        if err["type"] == "missing":
            return f"{self.path}.{'.'.join(loc)} is required for {self.path}.name {name!r}"
        line = describe_error(exc, root=self.get(name).section)
        if err["type"] == "value_error" or line.startswith(f"{self.path}."):
            return line  # a validator's own message names its fields already
        return f"{self.path}.{line}"

    def field(self) -> Any:
        """The annotation for the run config's field of this kind (validated here, dumped in full)."""
        return Annotated[SerializeAsAny[self.base], BeforeValidator(self._validate_in_context)]

    def _validate_in_context(self, raw: Any, info: ValidationInfo) -> Section:
        return self.validate(raw, info)

    def default_section(self) -> Any:
        """A ``Field`` whose default is the default component's section with its defaults."""
        return Field(default_factory=lambda: self.get(self.default).section())


class ComponentSection(Section):
    """Base of a component's section: its ``name`` selects it; subclasses narrow it to a Literal.

    ``summary`` (a ClassVar) is the component's one-line description where its Component gives none.
    """

    name: str
    summary: ClassVar[str] = ""
