"""Registry of training modes: wire name -> Engine subclass, discovered, never hand-listed.

Defining an :class:`~edge_client.engines.base.Engine` subclass with a ``name`` registers
it (``Engine.__init_subclass__`` calls :func:`register_engine`); :func:`load_engines`
imports every module of the ``edge_client.engines`` package once, so a mode that lives
in its own module there is found without anyone listing it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from profiles.chooser import PolicyEntry

if TYPE_CHECKING:
    from edge_client.engines.base import Engine

__all__ = ["register_engine", "unregister_engine", "get_engine", "available_engines", "engine_policy",
           "load_engines", "UnknownModeError"]

_ENGINES: dict[str, type[Engine]] = {}
# Modules of this package that hold no engine.
_NOT_ENGINES = frozenset({"base", "registry"})
_loaded = False


class UnknownModeError(ValueError):
    """A mode name that no registered engine implements."""


def register_engine(engine_cls: type[Engine]) -> type[Engine]:
    """Register ``engine_cls`` under its ``name`` (done by defining the class).

    Raises:
        TypeError: the class lacks a declaration (name, settings, policy) or its policy
            row names another mode.
        ValueError: another class already holds the name.
    """
    from edge_client.engines.base import EngineSettings

    name = engine_cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{engine_cls.__name__} must set a non-empty class attribute `name`")
    settings_cls = getattr(engine_cls, "settings_cls", None)
    if not (isinstance(settings_cls, type) and issubclass(settings_cls, EngineSettings)):
        raise TypeError(f"{engine_cls.__name__}.settings_cls must be a subclass of EngineSettings")
    policy = getattr(engine_cls, "policy", None)
    if not isinstance(policy, PolicyEntry):
        raise TypeError(f"{engine_cls.__name__} must declare `policy`, a profiles.chooser.PolicyEntry "
                        "(its rank and memory model)")
    if policy.mode != name:
        raise TypeError(f"{engine_cls.__name__}.policy is the row of {policy.mode!r}, not of {name!r}")
    held = _ENGINES.get(name)
    same_definition = held is not None and (held.__module__, held.__qualname__) == (engine_cls.__module__,
                                                                                      engine_cls.__qualname__)
    if held is not None and held is not engine_cls and not same_definition:
        raise ValueError(f"an engine named {name!r} is already registered ({held.__name__})")
    _ENGINES[name] = engine_cls  # the same definition run again (a reloaded module) replaces itself
    return engine_cls


def unregister_engine(name: str) -> None:
    """Forget a mode (tests that define an engine of their own clean up with it)."""
    _ENGINES.pop(name, None)


def load_engines() -> None:
    """Import every module of ``edge_client.engines`` (once), registering their engines."""
    global _loaded
    if _loaded:
        return
    import edge_client.engines as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_ENGINES and not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _loaded = True


def get_engine(name: str) -> type[Engine]:
    load_engines()
    try:
        return _ENGINES[name]
    except KeyError:
        raise UnknownModeError(f"unknown mode {name!r}; available: {', '.join(sorted(_ENGINES))}") from None


def available_engines() -> list[str]:
    load_engines()
    return sorted(_ENGINES)


def engine_policy() -> list[PolicyEntry]:
    """The policy rows of every registered engine, best rank first: what the chooser offers."""
    load_engines()
    return sorted((cls.policy for cls in _ENGINES.values()), key=lambda entry: (entry.rank, entry.mode))
