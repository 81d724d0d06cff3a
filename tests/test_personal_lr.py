"""FedMeZO's personalised client-wise learning rates (coordinator/personal_lr.py): the
rule on synthetic statistics, the statistics from contributions, the aggregation that
applies them, and a real federation that runs them with bit-exact replay."""

from __future__ import annotations

import asyncio
import math

import pytest
from harness import Tiny, coordinator, make_tiny, write_data

from coordinator.aggregate import aggregate
from coordinator.config import ConfigError, FederationConfig
from coordinator.ledger import Ledger
from coordinator.personal_lr import ClientStatistics, personalised_rates, update_size
from edge_client.daemon import ClientConfig, EdgeClient
from edge_client.events import ClientCallbacks, SyncEvent
from protocol.messages import Update

LR = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_the_rule_gives_fedmezos_equation() -> None:
    # x = (1, 2, 6): mean 3, largest deviation 3; δ = lr / 2.
    rates = personalised_rates(LR, 0.5, ["a", "b", "c"], {"a": 1.0, "b": 2.0, "c": 6.0})
    assert rates["a"] == pytest.approx(LR + 0.5 * LR * (1 - 3) / 3)
    assert rates["b"] == pytest.approx(LR + 0.5 * LR * (2 - 3) / 3)
    assert rates["c"] == pytest.approx(LR * 1.5)  # the farthest client sits on the bound
    assert all(LR * 0.5 <= rate <= LR * 1.5 for rate in rates.values())


@pytest.mark.parametrize("count", [2, 3, 7, 40])
def test_any_number_of_clients_stays_within_the_spread_and_keeps_the_mean(count: int) -> None:
    clients = [f"c{i}" for i in range(count)]
    statistics = {client: math.sin(i) * 3 + i / 7 for i, client in enumerate(clients)}
    rates = personalised_rates(LR, 0.3, clients, statistics)
    assert all(LR * 0.7 - 1e-18 <= rate <= LR * 1.3 + 1e-18 for rate in rates.values())
    assert max(abs(rate - LR) for rate in rates.values()) == pytest.approx(0.3 * LR)
    assert sum(rates.values()) / count == pytest.approx(LR)  # deviations from the mean cancel
    order = sorted(clients, key=statistics.__getitem__)
    assert [rates[c] for c in order] == sorted(rates.values())  # larger statistic, larger rate


def test_equal_statistics_missing_ones_and_a_lone_statistic_give_the_global_rate() -> None:
    assert personalised_rates(LR, 0.5, ["a", "b", "c"], {"a": 2.5, "b": 2.5, "c": 2.5}) == dict.fromkeys("abc", LR)
    assert personalised_rates(LR, 0.5, ["a", "b"], {"a": 2.5}) == {"a": LR, "b": LR}
    assert personalised_rates(LR, 0.5, ["a", "b"], {}) == {"a": LR, "b": LR}
    # A client that skipped rounds (no statistic) keeps lr; the others spread around it,
    # with the mean and the deviation taken over those that have one.
    rates = personalised_rates(LR, 0.5, ["new", "a", "b"], {"a": 1.0, "b": 3.0, "new": None})
    assert rates == {"new": LR, "a": pytest.approx(LR * 0.5), "b": pytest.approx(LR * 1.5)}
    rates = personalised_rates(LR, 0.5, ["a", "b"], {"a": 1.0, "b": float("nan")})
    assert rates == {"a": LR, "b": LR}
    assert personalised_rates(LR, 0.0, ["a", "b"], {"a": 1.0, "b": 3.0}) == {"a": LR, "b": LR}
    with pytest.raises(ValueError, match="spread"):
        personalised_rates(LR, 1.0, ["a"], {})


def test_statistics_come_from_the_last_contributions() -> None:
    last, mean, size = ClientStatistics("last_loss"), ClientStatistics("mean_loss"), ClientStatistics("update_size")
    for index, loss in enumerate([9.0, 1.0, 2.0, 3.0, 4.0, 5.0]):
        for statistics in (last, mean, size):
            statistics.observe("a", loss, [3.0 * (index + 1), -4.0 * (index + 1)])
    assert last.value("a") == 5.0
    assert mean.value("a") == pytest.approx(3.0)  # the last five: 1..5, not the first 9
    assert size.value("a") == pytest.approx(6 * math.sqrt((9 + 16) / 2))
    assert last.value("never") is None and size.value("never") is None
    assert update_size([float("nan"), float("inf")]) is None
    with pytest.raises(ValueError, match="statistic"):
        ClientStatistics("loss")


def update(client: str, values: list[float]) -> Update:
    return Update(round=1, attempt=0, client_id=client, pairs=tuple(enumerate(values, start=1)), num_examples=4,
                  loss_before=2.0, loss_after=1.0, nonce=bytes(16), signature=None)


def test_aggregation_combines_each_clients_values_at_its_own_rate() -> None:
    updates = [update("a", [1.0, -2.0]), update("b", [3.0, 4.0])]
    plain = aggregate([1, 2], updates, LR, "mean")
    scaled = aggregate([1, 2], updates, LR, "mean", rate_scales={"a": 0.5, "b": 1.5})
    assert plain == [(1, pytest.approx(-LR * 2.0)), (2, pytest.approx(-LR * 1.0))]
    assert scaled == [(1, pytest.approx(-LR * (0.5 + 4.5) / 2)), (2, pytest.approx(-LR * (-1.0 + 6.0) / 2))]


def test_the_config_takes_the_statistic_and_the_spread() -> None:
    config = FederationConfig(model_hash="a" * 64, personalised_lr="mean_loss", personalised_lr_spread=0.25)
    assert (config.personalised_lr, config.personalised_lr_spread) == ("mean_loss", 0.25)
    with pytest.raises(ConfigError, match="personalised_lr"):
        FederationConfig(model_hash="a" * 64, personalised_lr="loss")
    with pytest.raises(ConfigError, match="personalised_lr_spread"):
        FederationConfig(model_hash="a" * 64, personalised_lr="last_loss", personalised_lr_spread=1.0)


def test_a_federation_with_personalised_rates_replays_bit_exactly(tmp_path, tiny: Tiny) -> None:
    seen: dict[str, dict[int, str]] = {}

    async def body() -> None:
        settings = dict(rounds=4, clients_per_round=3, quorum=3, min_clients=3, local_steps=4,
                        learning_rate=LR, personalised_lr="last_loss", aggregation="mean")
        async with coordinator(tmp_path, tiny, **settings) as server:
            clients = []
            for index, name in enumerate(("a", "b", "c")):
                def on_sync(event: SyncEvent, name: str = name) -> None:
                    seen.setdefault(name, {})[event.round] = event.fingerprint

                # Different data per client, so their losses, hence their rates, differ.
                made = EdgeClient(ClientConfig(
                    url=f"ws://127.0.0.1:{server.port}", client_id=name, mode="mezo",
                    data_path=str(write_data(tmp_path / f"{name}.jsonl", 12, offset=40 * index)),
                    model=str(tiny.directory), device="cpu", copies="memory", memory_budget_bytes=4 << 30,
                    cache_dir=str(tmp_path / "cache")), callbacks=ClientCallbacks(on_sync=on_sync))
                made.prepare()
                clients.append(made)
            await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 240)

    asyncio.run(body())
    # Every client holds the same weights after every round.
    assert seen["a"] == seen["b"] == seen["c"] and set(seen["a"]) >= {0, 1, 2, 3, 4}
    with Ledger(tmp_path / "ledger.db") as ledger:
        rates = {r: {c.client_id: c.learning_rate for c in ledger.contributions(r)} for r in range(1, 5)}
        # Round 1: no statistic yet, everyone at lr; later rounds spread within lr (1 ± 0.5).
        assert rates[1] == dict.fromkeys("abc", LR)
        later = [rate for r in (2, 3, 4) for rate in rates[r].values()]
        assert len(set(later)) > 1 and all(0.5 * LR <= rate <= 1.5 * LR for rate in later)
        # The client farthest from the mean statistic sits on a bound of the spread.
        assert all(max(abs(rate - LR) for rate in rates[r].values()) == pytest.approx(0.5 * LR) for r in (2, 3, 4))
        for round_number in range(1, 5):
            # The committed coefficients are the mean of each client's rate times its scalar.
            by_seed: dict[int, list[float]] = {}
            for c in ledger.contributions(round_number):
                for seed, value in c.pairs:
                    by_seed.setdefault(seed, []).append(c.learning_rate * value)
            committed = dict(ledger.get_round(round_number).coefficients)
            for seed, values in by_seed.items():
                assert committed[seed] == pytest.approx(-sum(values) / len(values), rel=1e-6)
