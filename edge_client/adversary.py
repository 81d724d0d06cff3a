"""A poisoning client, for robustness experiments only (bench/chaos.py, tests).

It trains like any client and then corrupts what it reports, the way a Byzantine client
would: ``sign_flip`` sends ``-scale * g`` for every seed (the attack issue #10 measures
robust aggregation against: scale 100), ``scale`` sends ``scale * g``, ``constant`` sends ``scale`` for every seed,
``noise`` sends Gaussian noise of standard deviation ``scale``. Its updates are signed
when it has a key: an allowed client is the threat robust aggregation exists for.

    python -m edge_client.adversary --attack sign_flip --attack-scale 100 <edgefed-client flags>
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys

from edge_client.cli import build_parser, main as client_main
from edge_client.daemon import ClientConfig, EdgeClient
from edge_client.engines import LocalUpdate
from protocol.messages import PackedUpdate, RoundTask, Update
from protocol.table import fl32

__all__ = ["ATTACKS", "AdversarialClient", "poison"]

ATTACKS = ("sign_flip", "scale", "constant", "noise")
# Keep every value a finite float32 the codec accepts, however large the scale.
_LIMIT = 1e30


def poison(value: float, attack: str, scale: float, rng: random.Random) -> float:
    """The value an adversary reports instead of the honest projected gradient ``value``."""
    if attack == "sign_flip":
        bad = -scale * value
    elif attack == "scale":  # the honest direction, blown up: what norm clipping exists for
        bad = scale * value
    elif attack == "constant":
        bad = scale
    elif attack == "noise":
        bad = rng.gauss(0.0, scale)
    else:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    return fl32(max(-_LIMIT, min(_LIMIT, bad)))


class AdversarialClient(EdgeClient):
    """An :class:`EdgeClient` whose updates are poisoned by ``attack``."""

    def __init__(self, config: ClientConfig, *, attack: str = "sign_flip", scale: float = 100.0) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        super().__init__(config)
        self.attack = attack
        self.scale = scale
        self._rng = random.Random(config.client_id)

    def _make_update(self, task: RoundTask, result: LocalUpdate, encoding: str = "pairs") -> Update | PackedUpdate:
        pairs = tuple((seed, poison(value, self.attack, self.scale, self._rng)) for seed, value in result.pairs)
        return super()._make_update(task, dataclasses.replace(result, pairs=pairs), encoding)


def main(argv: list[str] | None = None) -> int:
    parser: argparse.ArgumentParser = build_parser()
    parser.prog = "python -m edge_client.adversary"
    parser.add_argument("--attack", choices=ATTACKS, default="sign_flip")
    parser.add_argument("--attack-scale", type=float, default=100.0)
    return client_main(argv, parser=parser, make_client=lambda config, args: AdversarialClient(
        config, attack=args.attack, scale=args.attack_scale))


if __name__ == "__main__":
    sys.exit(main())
