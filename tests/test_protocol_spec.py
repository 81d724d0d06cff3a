"""PROTOCOL.md read as an outsider reads it, then checked against a running coordinator.

Each test parses a part of the document (the §7.2 check table, the §2.1 ``/status``
tables) and compares it with what an in-process coordinator on 127.0.0.1 answers over
real websockets, so the document cannot drift from the code unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from websockets.asyncio.client import ClientConnection, connect

from coordinator.allowlist import AllowEntry, Allowlist
from coordinator.config import FederationConfig
from coordinator.ledger import Ledger
from coordinator.server import Coordinator
from protocol import codec
from protocol.messages import (
    Challenge,
    DeviceProfile,
    Error,
    Fingerprint,
    Hello,
    Message,
    RoundCommit,
    RoundTask,
    Update,
    UpdateAck,
    Welcome,
)
from protocol.signing import hello_signed_bytes, update_signed_bytes

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "PROTOCOL.md"
HASH = "cd" * 32
DIGEST = "00" * 32  # fingerprint.table_digest is not checked by the coordinator
AGREED, OUTLIER = "11" * 32, "22" * 32  # fingerprints: the majority's and a dissenter's
TIMEOUT_S = 5.0
DEVICE = DeviceProfile(device_type="cpu", device_name="spec test", accelerator_total_bytes=0,
                       accelerator_free_bytes=0, host_total_bytes=1 << 33, host_free_bytes=1 << 32,
                       memory_budget_bytes=None)


# ------------------------------------------------------------------ reading the document


def section(heading: str) -> str:
    """The text of the PROTOCOL.md section whose heading starts with ``heading`` (e.g.
    ``"### 7.2"``), up to the next heading of the same or a higher level."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    level = heading.split()[0]
    match = re.search(rf"^{re.escape(heading)}.*$", text, re.MULTILINE)
    assert match is not None, f"PROTOCOL.md has no heading {heading!r}"
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def table_rows(lines: list[str]) -> list[list[str]]:
    """The body rows of the first markdown table in ``lines``, as stripped cells (an
    escaped ``\\|`` inside a cell does not split it)."""
    rows: list[list[str]] = []
    started = False
    for line in lines:
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            continue
        rows.append(cells)
    return rows[1:]  # without the header row


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ------------------------------------------------------------------ a coordinator to talk to


@contextlib.asynccontextmanager
async def running_coordinator(tmp_path: Path, *, allowlist: Allowlist | None = None,
                              **overrides: Any) -> AsyncIterator[Coordinator]:
    settings: dict[str, Any] = dict(model_hash=HASH, port=0, ledger_path=str(tmp_path / "ledger.db"), rounds=0,
                                    min_clients=100, pool_key=12345, seed_pool_size=64, local_steps=3,
                                    deadline_s=30.0)
    settings.update(overrides)
    config = FederationConfig(**settings)
    with Ledger(config.ledger_path) as ledger:
        coordinator = Coordinator(config, ledger, allowlist=allowlist)
        task = asyncio.create_task(coordinator.run())
        await poll(lambda: coordinator.port is not None or task.done(), "the coordinator to listen")
        if task.done():
            task.result()
        try:
            yield coordinator
        finally:
            coordinator.stop()
            await asyncio.wait_for(task, 30)


async def poll(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def get_status(coordinator: Coordinator) -> dict[str, Any]:
    url = f"http://127.0.0.1:{coordinator.port}/status"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=TIMEOUT_S).read())
    status: dict[str, Any] = json.loads(body)
    return status


@dataclass
class Client:
    """A fake client speaking the protocol over a real websocket; signs its hello and
    updates when it has a key (allow-list mode)."""

    client_id: str
    ws: ClientConnection
    challenge: Challenge
    key: Ed25519PrivateKey | None
    nonces: int = 0

    @classmethod
    async def join(cls, coordinator: Coordinator, client_id: str, *, key: Ed25519PrivateKey | None = None,
                   fingerprint: str = AGREED) -> Client:
        """Connect, say hello and report ``fingerprint`` for round 0 (which makes it ready)."""
        ws = await connect(f"ws://127.0.0.1:{coordinator.port}", open_timeout=TIMEOUT_S, compression=None)
        challenge = codec.decode(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
        assert isinstance(challenge, Challenge)
        client = cls(client_id, ws, challenge, key)
        hello = Hello(protocol_version=(2, 0), client_id=client_id, device=DEVICE, mode="mezo", model_hash=HASH,
                      last_round=0, table_digest=None, plan=None,
                      public_key=None if key is None else public_bytes(key), signature=None)
        if key is not None:
            hello = dataclasses.replace(hello, signature=key.sign(hello_signed_bytes(challenge, hello)))
        await client.send(hello)
        welcome = await client.recv()
        assert isinstance(welcome, Welcome), welcome
        await client.send(Fingerprint(round=0, fingerprint=fingerprint, table_digest=DIGEST))
        await poll(lambda: getattr(coordinator.sessions.get(client_id), "round", -1) >= 0, f"{client_id} to report")
        return client

    async def send(self, message: Message) -> None:
        await self.ws.send(codec.encode(message))

    async def recv(self) -> Message:
        return codec.decode(await asyncio.wait_for(self.ws.recv(), TIMEOUT_S))

    async def expect(self, kind: type[Message]) -> Any:
        """The next message of ``kind``, passing over round tasks and commits."""
        while True:
            message = await self.recv()
            if isinstance(message, kind):
                return message
            assert isinstance(message, (RoundTask, RoundCommit)), f"{self.client_id}: got {message}"

    def update(self, round_number: int, seeds: tuple[int, ...], *, gradient: float = 0.5, loss_before: float = 2.0,
               client_id: str | None = None, nonce: bytes | None = None) -> Update:
        """An update, signed when the client has a key, with a fresh nonce unless given."""
        if nonce is None:
            self.nonces += 1
            nonce = self.nonces.to_bytes(16, "big")
        update = Update(round=round_number, attempt=0, client_id=client_id or self.client_id,
                        pairs=tuple((seed, gradient * (index + 1)) for index, seed in enumerate(seeds)),
                        num_examples=12, loss_before=loss_before, loss_after=1.9, nonce=nonce, signature=None)
        if self.key is None:
            return update
        return dataclasses.replace(update, signature=self.key.sign(update_signed_bytes(self.challenge, update)))

    async def answer(self, update: Update) -> Error | UpdateAck:
        """Send ``update`` and return the coordinator's answer to it."""
        await self.send(update)
        while True:
            message = await self.recv()
            if isinstance(message, (Error, UpdateAck)):
                return message
            assert isinstance(message, (RoundTask, RoundCommit)), f"{self.client_id}: got {message}"


async def leave(coordinator: Coordinator, *clients: Client) -> None:
    """Close the clients and wait until the coordinator has let them go (stopping it while
    their disconnections are still being handled can race in Python 3.11)."""
    for client in clients:
        await client.ws.close()
    await poll(lambda: not any(client.client_id in coordinator.sessions for client in clients), "the clients to go")


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def tampered(update: Update) -> Update:
    """The update with one bit of its signature flipped."""
    assert update.signature is not None
    return dataclasses.replace(update, signature=bytes([update.signature[0] ^ 1]) + update.signature[1:])


# ------------------------------------------------------------ §7.2: the order of the checks


@dataclass(frozen=True)
class Check:
    """One row of the §7.2 table: the refusal codes it may answer and the error fields."""

    number: str
    codes: frozenset[str]
    fields: tuple[str | None, ...]

    def answers_with(self, field: str | None) -> bool:
        """Whether a refusal naming ``field`` fits this row (``[i]`` stands for any index)."""
        for documented in self.fields:
            if documented is None or field is None:
                if documented is field:
                    return True
                continue
            if re.fullmatch(re.escape(documented).replace(r"\[i\]", r"\[\d+\]"), field):
                return True
        return False


def documented_update_checks() -> list[Check]:
    """The §7.2 table, in order, without the final "accepted" row."""
    checks = []
    for cells in table_rows(section("### 7.2").splitlines()):
        number, _, codes, fields = cells[:4]
        if number == "—":
            continue
        checks.append(Check(number, frozenset(backticked(codes)),
                            tuple(None if field == "nil" else field for field in (backticked(fields) or ["nil"]))))
    return checks


@dataclass(frozen=True)
class Violation:
    """A way an update fails one check: the refusal it gets (``code``, ``field``) and the
    codes of its §7.2 row (which tell rows that share a code apart)."""

    row_codes: frozenset[str]
    code: str
    field: str | None

    def row(self, checks: list[Check]) -> int:
        matches = [index for index, check in enumerate(checks)
                   if check.codes == self.row_codes and check.answers_with(self.field)]
        assert len(matches) == 1, f"§7.2 has {len(matches)} rows for {self}"
        return matches[0]


def violation(code: str, field: str | None, *, row: tuple[str, ...] = ()) -> Violation:
    return Violation(frozenset(row or (code,)), code, field)


WRONG_CLIENT = violation("wrong_client", "update.client_id")
MISSING_SIGNATURE = violation("missing_signature", "update.signature")
BAD_SIGNATURE = violation("bad_signature", "update.signature")
REPLAYED_NONCE = violation("replay", "update.nonce", row=("replay", "out_of_window", "too_many_updates"))
FLAGGED = violation("fingerprint_mismatch", "update.client_id")
NO_ATTEMPT = violation("round_not_open", "update.round")
HUGE_LOSS = violation("invalid_field", "update.loss_before")
LATER_ATTEMPT = violation("round_not_open", "update.round", row=("stale_round", "round_not_open"))
CONFLICTING = violation("conflicting_update", None)
CLOSED = violation("round_closed", None)
NOT_ASSIGNED = violation("not_assigned", "update.client_id")
WRONG_SEEDS = violation("wrong_seeds", "update.pairs")
NON_FINITE = violation("invalid_field", "update.pairs[0][1]")

# Each case sends one update that fails every check it lists (and no other).
CASES: dict[str, tuple[Violation, ...]] = {
    "another client's id, unsigned": (WRONG_CLIENT, MISSING_SIGNATURE, NO_ATTEMPT),
    "bad signature, used nonce": (BAD_SIGNATURE, REPLAYED_NONCE, NO_ATTEMPT),
    "flagged, used nonce": (REPLAYED_NONCE, FLAGGED, NO_ATTEMPT),
    "flagged, no attempt": (FLAGGED, NO_ATTEMPT),
    "no attempt, loss 1e31": (NO_ATTEMPT, HUGE_LOSS),
    "loss 1e31, later round": (HUGE_LOSS, LATER_ATTEMPT),
    "unassigned, seeds reversed": (NOT_ASSIGNED, WRONG_SEEDS),
    "different content after the commit": (CONFLICTING, CLOSED),
    "unassigned, after the commit": (CLOSED, NOT_ASSIGNED),
}
# Adjacent checks no single update can fail together.
EXCLUSIVE = {
    frozenset({MISSING_SIGNATURE, BAD_SIGNATURE}): "an absent signature cannot fail to verify",
    frozenset({LATER_ATTEMPT, CONFLICTING}): "an update conflicts only within the current attempt",
    frozenset({WRONG_SEEDS, NON_FINITE}): "a non-finite value never gets past the decoder (§3.2)",
}


def test_every_adjacent_pair_of_documented_checks_is_exercised() -> None:
    """The cases above cover the §7.2 table: for each two neighbouring rows, some case
    fails both (so its answer shows which comes first), or no update can."""
    checks = documented_update_checks()
    known = {v for case in CASES.values() for v in case} | {v for pair in EXCLUSIVE for v in pair}
    by_row = {v.row(checks): v for v in known}
    assert sorted(by_row) == list(range(len(checks))), "a §7.2 row has no violation in this test"
    for index in range(len(checks) - 1):
        pair = frozenset({by_row[index], by_row[index + 1]})
        assert pair in EXCLUSIVE or any(pair <= set(case) for case in CASES.values()), (
            f"no case fails both §7.2 checks {checks[index].number} and {checks[index + 1].number}")


def assert_first_documented_answers(case: str, answer: Error | UpdateAck) -> None:
    checks = documented_update_checks()
    first = min(CASES[case], key=lambda v: v.row(checks))
    assert isinstance(answer, Error), f"{case}: {answer}"
    assert (answer.code, answer.field) == (first.code, first.field), (
        f"{case}: the coordinator answered {answer.code} ({answer.field}), but §7.2 lists check "
        f"{checks[first.row(checks)].number} ({first.code}) first")


def test_the_first_documented_check_answers_in_open_mode(tmp_path: Path) -> None:
    answers: dict[str, Error | UpdateAck] = {}

    async def body() -> None:
        async with running_coordinator(tmp_path, min_clients=3, clients_per_round=2, quorum=2) as coordinator:
            first = await Client.join(coordinator, "a")
            answers["no attempt, loss 1e31"] = await first.answer(first.update(1, (5, 6, 7), loss_before=1e31))
            clients = {"a": first, "b": await Client.join(coordinator, "b"), "c": await Client.join(coordinator, "c")}
            await poll(lambda: coordinator.machine is not None, "round 1 to open")
            assigned = coordinator.machine.assigned if coordinator.machine is not None else frozenset()
            (x, y), (z,) = ([c for cid, c in clients.items() if (cid in assigned) == chosen] for chosen in (True, False))
            seeds = (await x.expect(RoundTask)).seeds
            assert (await y.expect(RoundTask)).seeds == seeds
            answers["loss 1e31, later round"] = await x.answer(x.update(2, seeds, loss_before=1e31))
            answers["unassigned, seeds reversed"] = await z.answer(z.update(1, seeds[::-1]))
            for client in (x, y):
                assert isinstance(await client.answer(client.update(1, seeds)), UpdateAck)
            for client in clients.values():
                assert (await client.expect(RoundCommit)).round == 1
            answers["different content after the commit"] = await x.answer(x.update(1, seeds, gradient=0.25))
            answers["unassigned, after the commit"] = await z.answer(z.update(1, seeds))
            await leave(coordinator, *clients.values())

    asyncio.run(body())
    for case, answer in answers.items():
        assert_first_documented_answers(case, answer)


def test_the_first_documented_check_answers_in_allow_list_mode(tmp_path: Path) -> None:
    keys = {name: Ed25519PrivateKey.from_private_bytes(bytes([index]) * 32) for index, name in enumerate("abc", 1)}
    allowlist = Allowlist([AllowEntry(public_bytes(key), name) for name, key in keys.items()])
    answers: dict[str, Error | UpdateAck] = {}
    seeds = (5, 6, 7)

    async def body() -> None:
        async with running_coordinator(tmp_path, allowlist=allowlist) as coordinator:  # no round ever opens
            a, b = [await Client.join(coordinator, name, key=keys[name]) for name in "ab"]
            c = await Client.join(coordinator, "c", key=keys["c"], fingerprint=OUTLIER)
            told = await c.expect(Error)
            assert told.code == "fingerprint_mismatch" and told.field == "fingerprint.fingerprint"

            unsigned = dataclasses.replace(a.update(1, seeds, client_id="b"), signature=None)
            answers["another client's id, unsigned"] = await a.answer(unsigned)
            used = a.update(1, seeds)
            assert (await a.answer(used)).code == "round_not_open"  # the nonce is now spent
            answers["bad signature, used nonce"] = await a.answer(tampered(used))
            spent = c.update(1, seeds)
            assert (await c.answer(spent)).code == "fingerprint_mismatch"  # checked after the nonce
            answers["flagged, used nonce"] = await c.answer(c.update(1, seeds, nonce=spent.nonce))
            answers["flagged, no attempt"] = await c.answer(c.update(1, seeds))
            await leave(coordinator, a, b, c)

    asyncio.run(body())
    for case, answer in answers.items():
        assert_first_documented_answers(case, answer)


# ------------------------------------------------- §7.2: between a commit and the next attempt


def test_a_resend_between_a_commit_and_the_next_attempt_is_a_duplicate(tmp_path: Path) -> None:
    """As §7.2 says: after round 1 commits, and until the next attempt opens, resending the
    accepted update gets update_ack{duplicate} and changes nothing; once round 2 is open
    the same resend is stale_round."""

    async def body() -> None:
        async with running_coordinator(tmp_path, min_clients=2, clients_per_round=2, quorum=2) as coordinator:
            clients = [await Client.join(coordinator, name) for name in "ab"]
            seeds = [(await client.expect(RoundTask)).seeds for client in clients][0]
            sent = {client.client_id: client.update(1, seeds, gradient=index + 1.0)
                    for index, client in enumerate(clients)}
            for client in clients:
                assert (await client.answer(sent[client.client_id])).status == "accepted"
            commit = [await client.expect(RoundCommit) for client in clients][0]
            status = await get_status(coordinator)
            assert status["round"] == 1 and status["open_round"] is None  # committed, nothing open yet

            resend = await clients[0].answer(sent["a"])
            assert isinstance(resend, UpdateAck) and resend.status == "duplicate"
            assert (resend.round, resend.attempt) == (1, 0)
            contributions = coordinator.ledger.contributions(1)
            assert sorted(c.client_id for c in contributions) == ["a", "b"]
            assert {c.client_id: c.pairs for c in contributions} == {cid: u.pairs for cid, u in sent.items()}
            assert coordinator.ledger.last_round() == 1 and commit.num_updates == 2

            for client in clients:  # the round-1 fingerprints make both ready: round 2 opens
                await client.send(Fingerprint(round=1, fingerprint=AGREED, table_digest=DIGEST))
            for client in clients:
                assert (await client.expect(RoundTask)).round == 2
            stale = await clients[0].answer(sent["a"])
            assert isinstance(stale, Error) and (stale.code, stale.field) == ("stale_round", "update.round")
            await leave(coordinator, *clients)

    asyncio.run(body())


# ------------------------------------------------------------------ §2.1: /status keys


def documented_status_keys() -> dict[str, dict[str, str]]:
    """§2.1's tables, by the bold label above each: key -> documented JSON type."""
    tables: dict[str, dict[str, str]] = {}
    lines = section("### 2.1").splitlines()
    for index, line in enumerate(lines):
        label = re.fullmatch(r"\*\*(.+)\*\*", line.strip())
        if label is None:
            continue
        tables[label.group(1)] = {key: cells[1] for cells in table_rows(lines[index + 1:])
                                  for key in backticked(cells[0])}
    return tables


def documented_device_profile_fields() -> set[str]:
    lines = section("### 4.1").splitlines()
    start = lines.index(next(line for line in lines if line.startswith("**`DeviceProfile`**")))
    return {backticked(cells[0])[0] for cells in table_rows(lines[start + 1:])}


JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list of strings": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
    "null": lambda v: v is None,
}


def assert_documented(label: str, documented: dict[str, str], actual: dict[str, Any]) -> None:
    assert set(actual) == set(documented), (
        f"/status {label}: undocumented keys {sorted(set(actual) - set(documented))}, "
        f"documented but absent {sorted(set(documented) - set(actual))}")
    for key, kind in documented.items():
        allowed = [JSON_TYPES[name.strip()] for name in kind.split(" or ")]
        assert any(check(actual[key]) for check in allowed), f"/status {label}.{key} = {actual[key]!r} is not {kind}"


def test_status_has_exactly_the_documented_keys(tmp_path: Path) -> None:
    documented = documented_status_keys()
    assert {"Top level", "`aggregation`", "`open_round`", "Each item of `clients`",
            "Each item of `rounds`"} <= set(documented), sorted(documented)
    seen: dict[str, dict[str, Any]] = {}

    async def body() -> None:
        async with running_coordinator(tmp_path, min_clients=2, clients_per_round=2, quorum=2) as coordinator:
            clients = [await Client.join(coordinator, name) for name in "ab"]
            seeds = [(await client.expect(RoundTask)).seeds for client in clients][0]
            seen["open"] = await get_status(coordinator)
            for client in clients:
                assert isinstance(await client.answer(client.update(1, seeds)), UpdateAck)
            for client in clients:
                await client.expect(RoundCommit)
            for client in clients:
                await client.send(Fingerprint(round=1, fingerprint=AGREED, table_digest=DIGEST))
            await poll(lambda: all(s.round == 1 for s in coordinator.sessions.values()), "the round-1 fingerprints")
            seen["committed"] = await get_status(coordinator)
            await leave(coordinator, *clients)

    asyncio.run(body())
    opened, committed = seen["open"], seen["committed"]
    for status in (opened, committed):
        assert_documented("", documented["Top level"], status)
        assert_documented("aggregation", documented["`aggregation`"], status["aggregation"])
    assert opened["open_round"] is not None
    assert_documented("open_round", documented["`open_round`"], opened["open_round"])
    assert [client["client_id"] for client in committed["clients"]] == ["a", "b"]
    for client in committed["clients"]:
        assert_documented("clients[]", documented["Each item of `clients`"], client)
        assert set(client["device"]) == documented_device_profile_fields()
    assert [entry["round"] for entry in committed["rounds"]] == [1]
    assert_documented("rounds[]", documented["Each item of `rounds`"], committed["rounds"][0])


@pytest.mark.parametrize("heading", ["### 2.1", "### 7.2"])
def test_the_tables_these_tests_read_are_there(heading: str) -> None:
    """A guard for the parsers themselves: an emptied section would make the checks vacuous."""
    assert table_rows(section(heading).splitlines())
