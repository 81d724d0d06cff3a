"""Round state machine, aggregation and federation config."""

import pytest

from coordinator.aggregate import aggregate
from coordinator.config import ConfigError, load_config
from protocol.errors import InvalidState
from protocol.messages import Update
from protocol.round import RoundMachine, RoundState, UpdateRefused
from protocol.table import fl32

HASH = "ab" * 32


def update(client="a", round=3, attempt=0, pairs=((11, 0.5), (22, -1.0)), n=10, before=2.0, after=1.9):
    return Update(round=round, attempt=attempt, client_id=client, pairs=pairs, num_examples=n,
                  loss_before=before, loss_after=after, nonce=b"\0" * 16, signature=None)


def machine(quorum=2):
    return RoundMachine(3, 0, [11, 22], ["a", "b", "c"], quorum)


def test_round_becomes_ready_when_all_assigned_reply():
    m = machine()
    assert not m.receive(update("a")).duplicate
    assert not m.receive(update("b")).duplicate
    assert m.state is RoundState.COLLECTING
    m.receive(update("c"))
    assert m.is_ready()
    m.committed()
    assert m.state is RoundState.COMMITTED


def test_duplicate_update_is_idempotent_and_conflicting_one_refused():
    m = machine()
    m.receive(update("a"))
    assert m.receive(update("a")).duplicate
    with pytest.raises(UpdateRefused) as refused:
        m.receive(update("a", pairs=((11, 0.6), (22, -1.0))))
    assert refused.value.code == "conflicting_update"
    assert len(m.updates) == 1


@pytest.mark.parametrize(
    "bad, code",
    [
        (update("a", round=2), "stale_round"),
        (update("a", round=4), "round_not_open"),
        (update("a", attempt=1), "round_not_open"),
        (update("z"), "not_assigned"),
        (update("a", pairs=((11, 0.5), (99, 1.0))), "wrong_seeds"),
        (update("a", pairs=((22, 0.5), (11, 1.0))), "wrong_seeds"),
        (update("a", pairs=((11, 0.5),)), "wrong_seeds"),
    ],
)
def test_misdirected_updates_are_refused_without_counting(bad, code):
    m = machine()
    with pytest.raises(UpdateRefused) as refused:
        m.receive(bad)
    assert refused.value.code == code
    assert m.updates == {}


def test_deadline_commits_with_quorum_and_abandons_without():
    m = machine(quorum=2)
    m.receive(update("a"))
    m.receive(update("b"))
    assert m.deadline() is RoundState.READY
    with pytest.raises(UpdateRefused) as late:
        m.receive(update("c"))
    assert late.value.code == "round_closed"
    short = machine(quorum=2)
    short.receive(update("a"))
    assert short.deadline() is RoundState.ABANDONED
    with pytest.raises(InvalidState):
        short.committed()


def test_aggregate_is_example_weighted_mean_times_minus_lr_in_float32():
    # Three values with unequal weights: the trimmed mean (1.0 for seed 11) and the
    # median would give other results than the weighted mean asked for.
    updates = [update("a", pairs=((11, 1.0), (22, 3.0)), n=1), update("b", pairs=((11, 4.0), (22, -3.0)), n=3),
               update("c", pairs=((11, -2.0), (22, 0.5)), n=4)]
    coefficients = aggregate([11, 22], updates, learning_rate=1e-3, rule="mean")
    assert coefficients == [(11, fl32(-1e-3 * (1 * 1.0 + 3 * 4.0 + 4 * -2.0) / 8)),
                            (22, fl32(-1e-3 * (1 * 3.0 + 3 * -3.0 + 4 * 0.5) / 8))]
    assert [s for s, _ in aggregate([22, 11], updates, 1e-3, rule="mean")] == [22, 11]  # task order kept
    with pytest.raises(ValueError, match="no updates"):
        aggregate([11], [], 1e-3, rule="mean")


def test_config_from_toml_with_overrides(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text(f'[federation]\nid = "demo"\nrounds = 5\n[model]\nhash = "{HASH}"\n'
                    '[training]\nscope = "lora"\nlocal_steps = 4\n[rounds]\nquorum = 1\n')
    config = load_config(path, {"rounds": 9, "port": None})
    assert (config.federation_id, config.rounds, config.scope, config.local_steps, config.quorum) == (
        "demo", 9, "lora", 4, 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[model]\nhash = "xyz"\n', "model_hash"),
        (f'[model]\nhash = "{HASH}"\n[training]\nlearning_rate = -1\n', "learning_rate"),
        (f'[model]\nhash = "{HASH}"\n[training]\nlocal_steps = "4"\n', "local_steps"),
        (f'[model]\nhash = "{HASH}"\n[traning]\nx = 1\n', "unknown table"),
        (f'[model]\nhash = "{HASH}"\n[training]\nlr = 1\n', "unknown key training.lr"),
        (f'[model]\nhash = "{HASH}"\n[rounds]\nquorum = 5\nclients_per_round = 2\n', "quorum"),
        (f'[model]\nhash = "{HASH}"\n[training]\nseed_pool_size = 2\nlocal_steps = 3\n', "local_steps"),
        ('[federation]\nid = "x"\n', "model_hash: required"),
        (f'[model]\nhash = "{HASH}"\n[training]\naggregation = "avg"\n', "^aggregation: must be"),
        (f'[model]\nhash = "{HASH}"\n[training]\naggregation_trim = 0.5\n', "^aggregation_trim: .*0.5"),
        (f'[model]\nhash = "{HASH}"\n[training]\naggregation_clip = 0\n', "^aggregation_clip: "),
        (f'[model]\nhash = "{HASH}"\n[training]\naggregation_clip = "big"\n', "^aggregation_clip: expected a number"),
        (f'[model]\nhash = "{HASH}"\n[training]\naggregation_max_examples = 0\n', "^aggregation_max_examples: "),
        (f'[model]\nhash = "{HASH}"\n[training]\naggregation_max_examples = 1.5\n',
         "^aggregation_max_examples: expected an integer"),
        ("not toml = = 1", "fed.toml"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "fed.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_aggregation_defaults_to_the_robust_rule_and_reads_its_toml_keys(tmp_path):
    from coordinator.aggregate import AggregationRule

    default = load_config(None, {"model_hash": HASH})
    assert (default.aggregation, default.aggregation_rule) == ("trimmed_mean", AggregationRule())
    path = tmp_path / "fed.toml"
    path.write_text(f'[model]\nhash = "{HASH}"\n[training]\naggregation = "median"\naggregation_trim = 0.1\n'
                    'aggregation_clip = 50\naggregation_max_examples = 500\n')
    config = load_config(path, {"aggregation_clip": 60.0})
    assert config.aggregation_rule == AggregationRule("median", 0.1, 60.0, 500)
    assert isinstance(config.aggregation_clip, float)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_pool_key_is_optional_checked_and_bound_to_the_ledger(tmp_path):
    from coordinator.ledger import Ledger, LedgerError
    from coordinator.server import Coordinator

    assert load_config(None, {"model_hash": HASH}).pool_key is None
    with pytest.raises(ConfigError, match="pool_key"):
        load_config(None, {"model_hash": HASH, "pool_key": -1})
    with pytest.raises(ConfigError, match="pool_key"):
        load_config(None, {"model_hash": HASH, "pool_key": "7"})
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        assert Coordinator(load_config(None, {"model_hash": HASH, "pool_key": 7}), ledger).pool_key == 7
    with Ledger(path) as ledger:  # restarting without a key keeps the stored one
        assert Coordinator(load_config(None, {"model_hash": HASH}), ledger).pool_key == 7
        with pytest.raises(LedgerError, match="pool_key"):
            Coordinator(load_config(None, {"model_hash": HASH, "pool_key": 8}), ledger)


@pytest.mark.parametrize(
    "aggregation, clients_per_round, expected",
    [
        ("trimmed_mean", 1, 1), ("trimmed_mean", 2, 2), ("trimmed_mean", 3, 3), ("median", 4, 3),
        ("trimmed_mean", 5, 3), ("median", 7, 4), ("trimmed_mean", 10, 5),
        ("mean", 1, 1), ("mean", 2, 1), ("mean", 3, 2), ("mean", 10, 5),
    ],
)
def test_default_quorum_keeps_a_robust_method_in_force(aggregation, clients_per_round, expected):
    config = load_config(None, {"model_hash": HASH, "aggregation": aggregation,
                                "clients_per_round": clients_per_round})
    assert config.quorum is None and config.commit_quorum == expected
    # A robust round commits on at least 3 updates wherever 3 clients are asked.
    if aggregation != "mean" and clients_per_round >= 3:
        assert config.commit_quorum >= 3 and not config.quorum_defeats_robustness


def test_the_default_federation_needs_all_three_updates(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text(f'[model]\nhash = "{HASH}"\n')
    config = load_config(path)
    assert (config.aggregation, config.clients_per_round, config.commit_quorum) == ("trimmed_mean", 3, 3)


def test_an_explicit_quorum_is_kept_and_one_below_three_is_flagged(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text(f'[model]\nhash = "{HASH}"\n[rounds]\nclients_per_round = 3\nquorum = 2\n')
    config = load_config(path)
    assert config.commit_quorum == 2 and config.quorum_defeats_robustness
    assert not load_config(path, {"aggregation": "mean"}).quorum_defeats_robustness
    with pytest.raises(ConfigError, match="^quorum: must be between 1 and clients_per_round"):
        load_config(path, {"quorum": 0})


def test_an_explicit_low_quorum_is_logged_at_start(tmp_path, caplog):
    import asyncio
    import logging

    from coordinator.ledger import Ledger
    from coordinator.server import Coordinator

    async def start_and_stop(config):
        with Ledger(config.ledger_path) as ledger:
            coordinator = Coordinator(config, ledger)
            task = asyncio.create_task(coordinator.run())
            while coordinator.port is None:
                await asyncio.sleep(0.01)
            coordinator.stop()
            await task

    settings = {"model_hash": HASH, "port": 0, "ledger_path": str(tmp_path / "l.db"), "rounds": 1}
    with caplog.at_level(logging.WARNING, logger="coordinator.server"):
        asyncio.run(start_and_stop(load_config(None, {**settings, "quorum": 2})))
    assert any("quorum 2 is below 3" in r.getMessage() and "trimmed_mean" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coordinator.server"):
        asyncio.run(start_and_stop(load_config(None, settings)))
    assert not any("quorum" in r.getMessage() for r in caplog.records)
