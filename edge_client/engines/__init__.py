"""Training modes. Each is one module; registering it here is one line."""

from edge_client.engines.base import Engine, EngineError, LocalUpdate, RoundPlan
from edge_client.engines.mezo import MeZOConfig, MeZOEngine
from edge_client.engines.registry import available_engines, get_engine, register_engine

register_engine(MeZOEngine)

__all__ = [
    "Engine", "EngineError", "LocalUpdate", "RoundPlan", "MeZOConfig", "MeZOEngine",
    "available_engines", "get_engine", "register_engine",
]
