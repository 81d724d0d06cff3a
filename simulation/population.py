"""A simulated population of clients: who they are, what data and memory each has, when
each is online, how late each answers, and who attacks. Pure and deterministic: the same
settings and seed give the same population and the same schedule, on any machine.

Nothing here trains or connects; :mod:`simulation.host` plays the clients against a real
coordinator, and :mod:`simulation.cli` (``edgefed-sim``) spreads them over Ray actors.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_client.device import parse_bytes
from edge_client.splits import split_records
from profiles.devices import DEVICES

__all__ = ["DeviceClass", "PopulationError", "PopulationSettings", "VirtualClient", "build_population",
           "parse_device_mix"]


class PopulationError(ValueError):
    """Settings that describe no population; the message says which and why."""


@dataclass(frozen=True)
class DeviceClass:
    """A kind of device in the population: its name and the memory training may use."""

    name: str
    budget_bytes: int
    share: float


@dataclass(frozen=True)
class PopulationSettings:
    """What the population looks like.

    Attributes:
        clients: virtual clients, at least 1.
        alpha: the Dirichlet concentration of the non-IID data split (small: each client
            sees one or two task families; large: close to IID).
        device_mix: the device classes and their shares (they are normalised).
        availability: the long-run probability a client is online in a round.
        churn: the probability an online client goes offline at a round boundary; an
            offline one comes back with the probability that keeps ``availability``
            stationary (``churn * availability / (1 - availability)``).
        latency_median_s, latency_sigma: stragglers: a client's extra delay before its
            update is lognormal with this median and log-space standard deviation (0: none).
        attackers: the share of clients that poison their scalars.
        attack, attack_scale: what they send (:func:`edge_client.adversary.poison`:
            ``sign_flip`` sends ``-scale * g``, ``scale`` sends ``scale * g``).
        heldout: records held out from every client (the evaluator's).
        seed: everything random here derives from it.
    """

    clients: int
    alpha: float = 0.5
    device_mix: tuple[DeviceClass, ...] = field(default_factory=lambda: parse_device_mix("0.75GiB:0.5,4GiB:0.5"))
    availability: float = 0.05
    churn: float = 0.2
    latency_median_s: float = 0.0
    latency_sigma: float = 0.5
    attackers: float = 0.0
    attack: str = "sign_flip"
    attack_scale: float = 1.0
    heldout: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        from edge_client.adversary import ATTACKS

        if self.clients < 1:
            raise PopulationError(f"clients must be >= 1, got {self.clients}")
        if not self.alpha > 0:
            raise PopulationError(f"alpha must be > 0, got {self.alpha}")
        if not self.device_mix:
            raise PopulationError("the device mix names no device class")
        if not 0 < self.availability <= 1:
            raise PopulationError(f"availability must be in (0, 1], got {self.availability}")
        if not 0 <= self.churn <= 1:
            raise PopulationError(f"churn must be in [0, 1], got {self.churn}")
        if self.availability < 1 and self.churn * self.availability / (1 - self.availability) > 1:
            raise PopulationError(f"churn {self.churn} is too high to keep availability {self.availability}: "
                                  f"an offline client would have to return with probability above 1")
        if self.latency_median_s < 0 or self.latency_sigma < 0:
            raise PopulationError("latency median and sigma must be >= 0")
        if not 0 <= self.attackers <= 1:
            raise PopulationError(f"attackers must be a share in [0, 1], got {self.attackers}")
        if self.attack not in ATTACKS:
            raise PopulationError(f"unknown attack {self.attack!r}; known: {', '.join(ATTACKS)}")


@dataclass(frozen=True)
class VirtualClient:
    """One simulated client: its identity, data, device and behaviour."""

    client_id: str
    index: int
    records: tuple[dict, ...]
    device: DeviceClass
    attacker: bool
    settings: PopulationSettings = field(repr=False, compare=False)

    def online(self, round_number: int) -> bool:
        """Whether the client is connected while round ``round_number`` + 1 is trained
        (round 0: at the start): a two-state Markov chain per client, started from its
        stationary distribution and stepped once per committed round."""
        settings = self.settings
        rng = random.Random(f"{settings.seed}:online:{self.index}")
        state = rng.random() < settings.availability
        back = 1.0 if settings.availability >= 1 else settings.churn * settings.availability / (1 - settings.availability)
        for _ in range(round_number):
            state = rng.random() >= settings.churn if state else rng.random() < back
        return state

    def latency_s(self, round_number: int) -> float:
        """Its extra delay before sending its update of ``round_number`` (stragglers)."""
        settings = self.settings
        if settings.latency_median_s <= 0:
            return 0.0
        rng = random.Random(f"{settings.seed}:latency:{self.index}:{round_number}")
        return settings.latency_median_s * math.exp(settings.latency_sigma * rng.gauss(0.0, 1.0))


def parse_device_mix(text: str) -> tuple[DeviceClass, ...]:
    """``"0.75GiB:0.5,4GiB:0.5"`` or device-table names (``"Jetson Orin 8 GiB:1"``,
    profiles/devices.py) with their shares; shares are normalised.

    Raises:
        PopulationError: an entry is neither a size nor a device-table name, or a share is bad.
    """
    table = {device.name.lower(): device for device in DEVICES}
    classes = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, _, share_text = entry.rpartition(":")
        if not name:
            raise PopulationError(f"device mix entry {entry!r}: write SIZE:SHARE or DEVICE NAME:SHARE")
        try:
            share = float(share_text)
        except ValueError:
            raise PopulationError(f"device mix entry {entry!r}: the share {share_text!r} is not a number") from None
        if not share > 0:
            raise PopulationError(f"device mix entry {entry!r}: the share must be > 0")
        if name.lower() in table:
            device = table[name.lower()]
            classes.append(DeviceClass(device.name, device.budget_bytes, share))
            continue
        try:
            budget = parse_bytes(name)
        except ValueError:
            raise PopulationError(f"device mix entry {entry!r}: {name!r} is neither a memory size (e.g. 4GiB) nor "
                                  f"a device of the table ({', '.join(d.name for d in DEVICES)})") from None
        classes.append(DeviceClass(name, budget, share))
    if not classes:
        raise PopulationError("the device mix names no device class")
    total = sum(c.share for c in classes)
    return tuple(DeviceClass(c.name, c.budget_bytes, c.share / total) for c in classes)


def build_population(records: Sequence[dict], settings: PopulationSettings) -> tuple[list[VirtualClient], list[dict]]:
    """The clients (a Dirichlet split of ``records``, device classes dealt by share,
    attackers drawn by share) and the held-out records.

    Raises:
        PopulationError: fewer records than clients plus the held-out set.
    """
    if len(records) < settings.clients + settings.heldout:
        raise PopulationError(f"{len(records)} records cannot give {settings.clients} clients one record each "
                              f"besides the {settings.heldout} held out")
    split = split_records(records, clients=settings.clients, heldout=settings.heldout, scheme="dirichlet",
                          alpha=settings.alpha, seed=settings.seed)
    rng = random.Random(f"{settings.seed}:population")
    # Device classes by largest remainder, then shuffled: the shares hold exactly.
    quotas = [c.share * settings.clients for c in settings.device_mix]
    counts = [int(q) for q in quotas]
    for index in sorted(range(len(quotas)), key=lambda i: quotas[i] - counts[i], reverse=True)[
            :settings.clients - sum(counts)]:
        counts[index] += 1
    devices = [device for device, count in zip(settings.device_mix, counts) for _ in range(count)]
    rng.shuffle(devices)
    attackers = set(rng.sample(range(settings.clients), round(settings.attackers * settings.clients)))
    width = len(str(settings.clients - 1))
    clients = [VirtualClient(f"sim-{index:0{width}d}", index, tuple(split.clients[index]), devices[index],
                             index in attackers, settings)
               for index in range(settings.clients)]
    return clients, list(split.heldout)
