"""Registry of training modes: name -> Engine subclass."""

from __future__ import annotations

from edge_client.engines.base import Engine

__all__ = ["register_engine", "get_engine", "available_engines", "UnknownModeError"]

_ENGINES: dict[str, type[Engine]] = {}


class UnknownModeError(ValueError):
    """A mode name that no registered engine implements."""


def register_engine(engine_cls: type[Engine]) -> type[Engine]:
    """Register an engine class under its ``name``; a second class with the same name raises."""
    name = getattr(engine_cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{engine_cls.__name__} must set a non-empty class attribute `name`")
    if not hasattr(engine_cls, "config_cls"):
        raise TypeError(f"{engine_cls.__name__} must set the class attribute `config_cls`")
    if name in _ENGINES and _ENGINES[name] is not engine_cls:
        raise ValueError(f"an engine named {name!r} is already registered ({_ENGINES[name].__name__})")
    _ENGINES[name] = engine_cls
    return engine_cls


def get_engine(name: str) -> type[Engine]:
    try:
        return _ENGINES[name]
    except KeyError:
        raise UnknownModeError(f"unknown mode {name!r}; available: {', '.join(sorted(_ENGINES))}") from None


def available_engines() -> list[str]:
    return sorted(_ENGINES)
