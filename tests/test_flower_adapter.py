"""The Flower adapter (flower_adapter/): seed/scalar rounds inside a Flower app.

The main test runs a real Flower simulation (``flwr.simulation.run_simulation``, Ray
backend, one CPU per client) of two ClientApps on the tiny model, through the adapter's
own ServerApp and ClientApp, and then checks the ledger it wrote with this project's own
tools: the exporter rebuilds each round's model from the ledger file alone, and its
fingerprint must be the one every Flower client reported after applying that round; the
committed coefficients must be what the coordinator's aggregation makes of the
contributions stored with them. The other tests drive the same strategy and ClientApp
in this process through a small in-memory Grid (no Ray, fast), to reach the cases a
healthy simulation never shows: a client whose model drifts (flagged, told to rebuild,
agreeing again), a process that lost its copy (caught up within the round), and bad
input refused in one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from coordinator.aggregate import aggregate_with_report  # noqa: E402
from coordinator.config import ConfigError, FederationConfig  # noqa: E402
from coordinator.ledger import Ledger, LedgerError  # noqa: E402
from exporter.replay import read_ledger, rebuild  # noqa: E402
from flower_adapter.client_app import ClientSettings, make_client_app, node_setup  # noqa: E402
from flower_adapter.federation import UnsupportedSetting, draw_seeds  # noqa: E402
from flower_adapter.host import ClientAppError, ModelHost, engine_for  # noqa: E402
from flower_adapter.server_app import ServerSettings, make_server_app, settings_from_run_config  # noqa: E402
from flower_adapter.strategy import AbortedFederation, SeedScalarStrategy  # noqa: E402
from flower_adapter.wire import Answer, Instruction, WireError  # noqa: E402
from protocol.messages import PackedUpdate, SyncRequest, Update  # noqa: E402
from tests.harness import Tiny, make_tiny, write_data  # noqa: E402

ROUNDS = 3
# Generous for what crosses a round (an instruction of about 1 KB each way with Flower's
# own framing, and an answer with one float per seed); a model's worth would be ~240 KB.
MAX_BYTES_PER_CLIENT_ROUND = 8192


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


def data_files(directory: Path, count: int) -> list[str]:
    return [str(write_data(directory / f"client-{i}.jsonl", 12, offset=40 * i)) for i in range(count)]


def federation(tiny: Tiny, ledger: Path, clients: int, **overrides: Any) -> FederationConfig:
    settings: dict[str, Any] = dict(
        model_hash=tiny.model_hash, model_name="tiny", ledger_path=str(ledger), pool_key=7, seed_pool_size=64,
        local_steps=3, batch_size=2, max_seq_len=64, learning_rate=1e-3, rebase_every=3,
        clients_per_round=clients, min_clients=clients, deadline_s=120)
    settings.update(overrides)
    return FederationConfig(**settings)


def check_ledger_against_our_replay(ledger_path: Path, tiny: Tiny, config: FederationConfig,
                                    strategy: SeedScalarStrategy, clients: int, rounds: int = ROUNDS) -> None:
    """The ledger the Flower strategy wrote, checked with this project's own code."""
    facts = read_ledger(ledger_path)
    assert facts.last_round == rounds and facts.model_hash == tiny.model_hash and facts.scope.kind == config.scope
    assert facts.rebase_every == config.rebase_every and facts.federation_id == config.federation_id
    with Ledger(ledger_path) as ledger:
        pool_key = int(ledger.get_meta("pool_key") or -1)
        for number in range(1, rounds + 1):
            committed = ledger.get_round(number)
            contributions = ledger.contributions(number)
            assert len(contributions) == clients and committed.num_updates == clients
            assert any(coefficient != 0.0 for _, coefficient in committed.coefficients)
            # The coordinator's seed draw for the committed attempt (PROTOCOL.md §6.11) ...
            seeds = draw_seeds(pool_key, config.seed_pool_size, number, committed.attempt,
                               config.seeds_for_mode(strategy.mode))
            assert [seed for seed, _ in committed.coefficients] == seeds
            # ... and its aggregation of the contributions stored with the round.
            updates = [Update(round=number, attempt=committed.attempt, client_id=c.client_id, pairs=c.pairs,
                              num_examples=c.num_examples, loss_before=c.loss_before, loss_after=c.loss_after,
                              nonce=bytes(16), signature=None) for c in contributions]
            again = aggregate_with_report(seeds, updates, config.learning_rate, config.aggregation_rule)
            assert list(committed.coefficients) == again.coefficients
    for number in range(1, rounds + 1):
        # The exporter rebuilds the round from the ledger file and the base model alone,
        # and (verify=True) refuses unless the clients reported that fingerprint.
        rebuilt = rebuild(ledger_path, str(tiny.directory), round_number=number, verify=True)
        report = next(r for r in strategy.reports if r.round == number and r.committed)
        assert len(report.fingerprints) == clients, report.fingerprints
        assert set(report.fingerprints.values()) == {rebuilt.fingerprint}, (number, report.fingerprints)
        assert rebuilt.agreeing == sorted(report.fingerprints)


# -- a real Flower simulation ------------------------------------------------------------------


def ray_processes() -> list[Any]:
    import psutil

    names = ("raylet", "gcs_server", "ray::", "default_worker", "plasma_store")
    return [p for p in psutil.Process().children(recursive=True)
            if any(name in " ".join(_cmdline(p)) for name in names)]


def _cmdline(process: Any) -> list[str]:
    try:
        return list(process.cmdline())
    except Exception:  # gone meanwhile
        return []


def test_a_flower_simulation_commits_rounds_that_our_replay_rebuilds_bit_for_bit(tiny, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from flwr.simulation import run_simulation

    monkeypatch.delenv("PYTHONPATH", raising=False)  # Flower's Ray backend sets it for its workers; undone after
    ledger_path = tmp_path / "ledger.db"
    config = federation(tiny, ledger_path, clients=2)
    finished: list[SeedScalarStrategy] = []
    server = make_server_app(ServerSettings(config=config, mode="mezo", num_rounds=ROUNDS), on_finish=finished.append)
    client = make_client_app(ClientSettings(model=str(tiny.directory), data=data_files(tmp_path, 2), device="cpu"))
    started = time.monotonic()
    run_simulation(server_app=server, client_app=client, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    seconds = time.monotonic() - started
    assert finished, "the ServerApp did not finish its rounds"
    strategy = finished[0]
    committed = [r for r in strategy.reports if r.committed]
    assert [r.round for r in committed] == [1, 2, 3], [(r.round, r.failures) for r in strategy.reports]
    for report in committed:
        assert report.arrays_down == 0  # no model parameters were sent: the instructions hold no arrays
        assert len(report.trainers) == 2
        print(f"round {report.round}: {report.bytes_down} B down, {report.bytes_up} B up in {report.messages_down} "
              f"messages ({report.sync_retries} catch-up retries), {report.bytes_per_client:.0f} B per client")
        assert report.bytes_per_client < MAX_BYTES_PER_CLIENT_ROUND
    print(f"simulation of {ROUNDS} rounds with 2 clients: {seconds:.1f}s")
    check_ledger_against_our_replay(ledger_path, tiny, config, strategy, clients=2)
    import ray

    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes() == [], "Ray processes outlived the simulation"


# -- the same apps in this process -------------------------------------------------------------


class LocalGrid(Grid):
    """A Grid that hands each message straight to the node's ClientApp in this process
    (as Flower's simulation workers do: an app's exception becomes an error reply).
    ``before(message, grid)``, when given, sees every message before it is delivered; if
    it raises, the node answers with that error."""

    def __init__(self, apps: dict[int, ClientApp],
                 before: Callable[[Message, LocalGrid], None] | None = None) -> None:
        self.apps = apps
        self.before = before
        self.contexts = {node: Context(run_id=7, node_id=node, node_config={"partition-id": index},
                                       state=RecordDict(), run_config={})
                         for index, node in enumerate(apps)}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def push_messages(self, messages: Any) -> Any:
        raise NotImplementedError

    def pull_messages(self, message_ids: Any) -> Any:
        raise NotImplementedError

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            try:  # a hook that raises makes the node fail the message
                if self.before is not None:
                    self.before(message, self)
                replies.append(self.apps[node](message, self.contexts[node]))
            except Exception as error:
                replies.append(Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message))
        self.replies += replies
        return replies


@pytest.fixture
def task_identity():
    """Flower stamps messages with the running task's identity; a simulation sets it."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def local_apps(tiny: Tiny, tmp_path: Path, count: int) -> tuple[dict[int, ClientApp], dict[int, ModelHost]]:
    """``count`` simulated devices: each node its own app and model copy."""
    settings = ClientSettings(model=str(tiny.directory), data=data_files(tmp_path, count), device="cpu")
    hosts = {101 + i: ModelHost() for i in range(count)}
    return {node: make_client_app(settings, host=host) for node, host in hosts.items()}, hosts


def run_local(config: FederationConfig, grid: LocalGrid, rounds: int = ROUNDS, mode: str = "mezo"
              ) -> SeedScalarStrategy:
    with Ledger(config.ledger_path) as ledger:
        strategy = SeedScalarStrategy(config, ledger, mode=mode)
        strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=config.deadline_s)
    return strategy


def test_a_client_whose_model_drifts_is_flagged_left_out_and_rebuilt(tiny, tmp_path, task_identity):
    apps, hosts = local_apps(tiny, tmp_path, 3)

    def corrupt_before_round_2_commit(message: Message, grid: LocalGrid) -> None:
        instruction = Instruction.from_record(message.content)
        if (message.metadata.dst_node_id == 103 and message.metadata.message_type == MessageType.EVALUATE
                and instruction.target_round == 2):
            replica = hosts[103].replica
            assert replica is not None and replica.round == 1
            replica.sync.space.apply(123456789, 0.01)  # one stray direction: a silently corrupted copy

    config = federation(tiny, tmp_path / "ledger.db", clients=3)
    grid = LocalGrid(apps, before=corrupt_before_round_2_commit)
    strategy = run_local(config, grid)
    first, second, third = strategy.reports
    assert len(set(first.fingerprints.values())) == 1 and first.flagged == ()
    majority = second.fingerprints["node-101"]
    assert second.fingerprints["node-102"] == majority != second.fingerprints["node-103"]
    assert second.flagged == ("node-103",)
    # Flagged, node 103 trains no more (its update would come from the wrong model) and is
    # told to rebuild from the base weights and the table; then it agrees again.
    assert third.committed and third.trainers == ("node-101", "node-102")
    assert len(third.fingerprints) == 3 and len(set(third.fingerprints.values())) == 1
    assert third.flagged == () and strategy.flagged == set()
    resyncs = [Instruction.from_record(m.content) for m in grid.sent if m.metadata.dst_node_id == 103]
    # train 1, evaluate 1, train 2, evaluate 2 (the corruption), then only evaluate 3, which says: rebuild
    assert [(i.task is not None, i.resync) for i in resyncs] == [
        (True, False), (False, False), (True, False), (False, False), (False, True)]
    with Ledger(config.ledger_path) as ledger:
        assert ledger.fingerprints(2)["node-103"] != majority
    assert rebuild(config.ledger_path, str(tiny.directory), round_number=2, verify=True).fingerprint == majority
    assert rebuild(config.ledger_path, str(tiny.directory), round_number=3).fingerprint == third.fingerprints[
        "node-103"]
    for message in grid.sent:  # what went down: protocol messages in one config record, never an array
        assert dict(message.content.array_records) == {} and list(message.content.config_records) == ["edgefed"]


def test_a_flagged_client_is_repaired_even_when_the_next_round_fails(tiny, tmp_path, task_identity):
    apps, hosts = local_apps(tiny, tmp_path, 3)

    def corrupt_103_then_fail_the_others(message: Message, grid: LocalGrid) -> None:
        instruction = Instruction.from_record(message.content)
        node, task = message.metadata.dst_node_id, instruction.task
        if node == 103 and task is None and instruction.target_round == 2 and not instruction.resync:
            assert hosts[103].replica is not None
            hosts[103].replica.sync.space.apply(987654321, -0.01)
        if node in (101, 102) and task is not None and (task.round, task.attempt) == (3, 0):
            raise RuntimeError("out of memory")  # the healthy clients fail round 3's first attempt

    config = federation(tiny, tmp_path / "ledger.db", clients=3)
    grid = LocalGrid(apps, before=corrupt_103_then_fail_the_others)
    strategy = run_local(config, grid, rounds=4)
    first, second, failed, third = strategy.reports
    # Flagged after round 2, node 103 was not asked to train round 3's first attempt,
    # which failed: the other two ran out of memory.
    assert (failed.round, failed.attempt, failed.committed) == (3, 0, False)
    assert failed.failures[-1] == "abandoned: 0 of 2 updates, quorum 2"
    assert all("out of memory" in failure for failure in failed.failures[:-1])
    # Nothing committed in that Flower round, yet node 103 was told to rebuild round 2;
    # it then reported the majority's fingerprint of it, and trained round 3 again.
    to_103 = [(m.metadata.message_type, i.target_round, i.task is not None, i.resync)
              for m in grid.sent if m.metadata.dst_node_id == 103 for i in [Instruction.from_record(m.content)]]
    assert to_103 == [("train", 0, True, False), ("evaluate", 1, False, False), ("train", 1, True, False),
                      ("evaluate", 2, False, False), ("evaluate", 2, False, True), ("train", 2, True, False),
                      ("evaluate", 3, False, False)]
    with Ledger(config.ledger_path) as ledger:
        reported = ledger.fingerprints(2)
    assert len(set(reported.values())) == 1 and len(reported) == 3
    assert (third.round, third.attempt, third.committed) == (3, 1, True)
    assert third.trainers == ("node-101", "node-102", "node-103") and len(set(third.fingerprints.values())) == 1
    assert strategy.flagged == set()


def test_a_process_that_lost_its_copy_catches_up_within_the_round(tiny, tmp_path, task_identity):
    apps, hosts = local_apps(tiny, tmp_path, 2)
    fresh: list[ModelHost] = []

    def restart_node_102_before_round_3(message: Message, grid: LocalGrid) -> None:
        instruction = Instruction.from_record(message.content)
        if message.metadata.dst_node_id == 102 and instruction.task is not None and instruction.task.round == 3 \
                and not fresh:
            fresh.append(ModelHost())  # as if Flower ran the node in a new process
            grid.apps[102] = make_client_app(ClientSettings(model=str(tiny.directory),
                                                            data=data_files(tmp_path, 2), device="cpu"),
                                             host=fresh[0])

    config = federation(tiny, tmp_path / "ledger.db", clients=2, rebase_every=2)
    strategy = run_local(config, LocalGrid(apps, before=restart_node_102_before_round_3))
    assert [r.committed for r in strategy.reports] == [True, True, True]
    third = strategy.reports[2]
    assert third.trainers == ("node-101", "node-102")  # it trained in the round it joined
    assert third.sync_retries == 1  # asked once, was sent the snapshot (rebase round 2's table + nothing after)
    assert fresh[0].replica is not None and fresh[0].replica.round == 3
    assert len(set(third.fingerprints.values())) == 1
    check_ledger_against_our_replay(Path(config.ledger_path), tiny, config, strategy, clients=2)


def test_ferret_clients_on_the_lora_scope_send_one_byte_per_seed(tiny, tmp_path, task_identity):
    apps, _ = local_apps(tiny, tmp_path, 2)
    config = federation(tiny, tmp_path / "ledger.db", clients=2, scope="lora", lora_rank=2,
                        modes={"ferret": {"seeds": 48, "value_encoding": "q8", "local_steps": 2}})
    grid = LocalGrid(apps)
    strategy = run_local(config, grid, rounds=2, mode="ferret")
    assert [r.committed for r in strategy.reports] == [True, True], [r.failures for r in strategy.reports]
    trains = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert {Instruction.from_record(m.content).task.settings for m in trains} == {  # type: ignore[union-attr]
        (("local_steps", 2), ("value_encoding", "q8"))}
    updates = [Answer.from_record(m.content).update for m in grid.replies
               if m.metadata.message_type == MessageType.TRAIN]
    assert len(updates) == 4 and all(isinstance(u, PackedUpdate) and u.encoding == "q8" and len(u.values) == 48
                                     for u in updates)
    for report in strategy.reports:
        assert len(report.coefficients) == 48 and any(c != 0.0 for _, c in report.coefficients)
    check_ledger_against_our_replay(Path(config.ledger_path), tiny, config, strategy, clients=2, rounds=2)


def test_a_copy_reaches_the_round_from_what_it_is_sent_or_asks_for_what_it_lacks(tiny, tmp_path):
    from flower_adapter.federation import sync_response

    ledger_path = tmp_path / "ledger.db"
    host = ModelHost()
    with Ledger(ledger_path) as ledger:
        strategy = SeedScalarStrategy(federation(tiny, ledger_path, clients=1), ledger)  # rebase_every 3
        for number in (1, 2, 3, 4):
            ledger.commit_round(number, 0, [(1000 + number, 0.25)], [])
        setup = node_setup(ClientSettings(model=str(tiny.directory), data=data_files(tmp_path, 1), device="cpu"),
                           {"partition-id": 0}, {})
        replica = host.replica_for(7, setup, strategy.federation, "mezo")
        head = ledger.get_round(4)
        # Nothing sent, and the copy is behind: it asks for what follows its round.
        assert host.reach(4, head.table_digest, None) == SyncRequest(have_round=0)
        # The response for a copy at rebase round 3 carries round 3's table: a copy at 0
        # rebuilds from it, then applies round 4.
        response = sync_response(ledger, 3, 3)
        assert (response.base_round, len(response.table), len(response.rounds)) == (3, 3, 1)
        assert host.reach(4, head.table_digest, response) is None
        assert (replica.round, replica.table_digest()) == (4, head.table_digest)
        # From round 4 (no rebase) only round 5 is sent; a response whose digest does not
        # match what the rounds make is not trusted: the copy asks for a full sync ...
        ledger.commit_round(5, 0, [(2005, -0.5)], [])
        head = ledger.get_round(5)
        incremental = sync_response(ledger, 3, 4)
        assert (incremental.base_round, incremental.table, len(incremental.rounds)) == (4, (), 1)
        tampered = type(incremental)(target_round=5, base_round=4, table=(), rounds=incremental.rounds,
                                     table_digest="0" * 64)
        assert host.reach(5, head.table_digest, tampered) == SyncRequest(have_round=0)
        # ... and the full one (round 3's table and rounds 4, 5) puts it right.
        assert host.reach(5, head.table_digest, sync_response(ledger, 3, 0)) is None
        assert (replica.round, replica.table_digest()) == (5, head.table_digest)
        assert host.reach(5, head.table_digest, None) is None  # nothing to do at the head
        fingerprint = replica.fingerprint()
        assert host.reach(5, head.table_digest, sync_response(ledger, 3, 0), resync=True) is None
        assert replica.fingerprint() == fingerprint  # a rebuild of the same round gives the same bits


# -- bad input, in one line ---------------------------------------------------------------------


def test_bad_client_input_is_refused_in_one_line(tiny, tmp_path):
    with pytest.raises(ClientAppError, match=r"^model not found: '/nowhere/model'"):
        ClientSettings(model="/nowhere/model")
    with pytest.raises(ClientAppError, match=r"^data file not found: '.*missing.jsonl'"):
        ClientSettings(model=str(tiny.directory), data=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(ClientAppError, match=r"^no model: set 'model' in the run config"):
        node_setup(None, {"partition-id": 0}, {})
    with pytest.raises(ClientAppError, match=r"^no data file for this node"):
        node_setup(None, {"partition-id": 0}, {"model": str(tiny.directory)})
    with pytest.raises(ClientAppError, match=r"^data file not found: '.*part-1.jsonl'"):
        node_setup(None, {"partition-id": 1}, {"model": str(tiny.directory), "data": str(tmp_path / "part-{partition}.jsonl")})
    with pytest.raises(ClientAppError, match=r"^unknown mode 'sgd'; available: .*mezo"):
        engine_for("sgd")
    with pytest.raises(ClientAppError, match=r"trains through a FedBiOT emulator"):
        engine_for("fedbiot")
    files = data_files(tmp_path, 2)
    setup = node_setup(None, {"partition-id": 1}, {"model": str(tiny.directory),
                                                   "data": files[1].replace("client-1", "client-{partition}")})
    assert setup.data == Path(files[1]) and setup.stream_name == "partition-1"
    assert node_setup(ClientSettings(data=files), {"partition-id": 0, "model": str(tiny.directory)}, {}).data \
        == Path(files[0])


def test_every_client_failing_the_same_way_stops_the_federation_with_their_reason(tiny, tmp_path, task_identity):
    apps, _ = local_apps(tiny, tmp_path, 2)
    config = federation(tiny, tmp_path / "ledger.db", clients=2)
    with pytest.raises(AbortedFederation, match=r"unknown mode 'sgd'; available: "):
        run_local(config, LocalGrid(apps), mode="sgd")
    with Ledger(config.ledger_path) as ledger:
        assert ledger.last_round() == 0


def test_bad_server_input_is_refused_in_one_line(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"^model_hash: required: set 'model-hash' in the run config"):
        settings_from_run_config({"num-server-rounds": 3})
    with pytest.raises(ConfigError, match=r"^rounds: the Flower adapter runs a fixed number of rounds"):
        settings_from_run_config({"model-hash": tiny.model_hash, "num-server-rounds": 0})
    settings = settings_from_run_config({"model-hash": tiny.model_hash, "num-server-rounds": 2, "mode": "ferret",
                                         "learning-rate": 0.01, "ledger": str(tmp_path / "l.db"),
                                         "seed-pool-size": 128, "model": "ignored: a client key", "data": "x"})
    assert (settings.rounds, settings.mode, settings.config.learning_rate, settings.config.seed_pool_size,
            settings.config.ledger_path) == (2, "ferret", 0.01, 128, str(tmp_path / "l.db"))
    toml = tmp_path / "federation.toml"
    toml.write_text(f'[model]\nhash = "{tiny.model_hash}"\n[training]\nlocal_steps = 5\n[modes.ferret]\nseeds = 16\n')
    settings = settings_from_run_config({"federation-config": str(toml), "rebase-every": 4})
    assert (settings.config.local_steps, settings.config.seeds_for_mode("ferret"), settings.config.rebase_every) \
        == (5, 16, 4)
    with Ledger(tmp_path / "other.db") as ledger:
        with pytest.raises(UnsupportedSetting, match=r"^personalised_lr is not supported"):
            SeedScalarStrategy(federation(tiny, tmp_path / "other.db", 2, personalised_lr="mean_loss"), ledger)
        SeedScalarStrategy(federation(tiny, tmp_path / "other.db", 2), ledger)
        with pytest.raises(LedgerError, match=r"meta 'federation_id' is already 'edgefed'"):
            SeedScalarStrategy(federation(tiny, tmp_path / "other.db", 2, federation_id="another"), ledger)


def test_an_answer_carries_exactly_one_thing_and_a_task_must_build_on_the_ledger(tiny, tmp_path, task_identity):
    with pytest.raises(WireError, match="exactly one of update, fingerprint, sync-request"):
        Answer(holder="h", held=0)
    with pytest.raises(WireError, match="no 'edgefed' config record"):
        Answer.from_record(RecordDict())
    ledger_path = tmp_path / "ledger.db"
    with Ledger(ledger_path) as ledger:
        strategy = SeedScalarStrategy(federation(tiny, ledger_path, clients=1, min_clients=1), ledger)
        grid = LocalGrid({101: make_client_app()})
        (message,) = strategy.configure_train(1, ArrayRecord(), None, grid)  # type: ignore[arg-type]
    instruction = Instruction.from_record(message.content)
    assert instruction.task is not None and instruction.task.base_round == 0 and instruction.sync is None
    assert instruction.task.seeds == tuple(draw_seeds(strategy.pool_key, 64, 1, 0, 3))
    content = message.content
    content.config_records["edgefed"]["table-digest"] = 5
    with pytest.raises(WireError, match="'welcome', 'table-digest' and 'mode' are required"):
        Instruction.from_record(content)
