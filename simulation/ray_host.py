"""The Ray actor that hosts a :class:`simulation.host.SimHost`: one model copy, its
share of the virtual clients, on ``num_cpus``/``num_gpus`` of a node (Ray's resource
model). Kept apart from :mod:`simulation.host` so the host runs (and is tested) without Ray."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from simulation.host import SimHost
from simulation.population import VirtualClient

__all__ = ["HostActor"]


@ray.remote
class HostActor:
    """Loads the model once, then plays its clients until the federation completes."""

    def __init__(self, *, url: str, model: str, mode: str, clients: list[VirtualClient], cache_dir: str | None,
                 final_round: int, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # Ray's share of the node, not every core
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("edge_client.splits").setLevel(logging.ERROR)
        self.host = SimHost(url=url, model=model, mode=mode, clients=clients, cache_dir=cache_dir,
                            final_round=final_round)
        self.host.load()

    def run(self) -> dict[str, Any]:
        result = asyncio.run(self.host.run())
        result["node"] = ray.get_runtime_context().get_node_id()
        return result
