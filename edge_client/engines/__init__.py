"""Training modes. Each is one module of this package, found and registered on its own
(see :mod:`edge_client.engines.base` for what a mode declares)."""

from edge_client.engines.base import (
    Engine,
    EngineError,
    EngineRefused,
    EngineSettings,
    LocalUpdate,
    RoundPlan,
    SettingsError,
)
from edge_client.engines.registry import (
    UnknownModeError,
    available_engines,
    engine_policy,
    get_engine,
    load_engines,
    register_engine,
    unregister_engine,
)

__all__ = [
    "Engine", "EngineError", "EngineRefused", "EngineSettings", "LocalUpdate", "RoundPlan", "SettingsError", "UnknownModeError",
    "available_engines", "engine_policy", "get_engine", "load_engines", "register_engine", "unregister_engine",
]
