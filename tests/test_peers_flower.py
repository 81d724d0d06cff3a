"""bench/_peers_flower.py: Flower's real FedAvg over its gRPC transport, with client
processes, on the tiny model. The rounds' checkpoints are checked against the same
local SGD steps recomputed here, the bytes against the float32 payload, and the run
against its budget, its failures and its leftovers."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("flwr")

from bench._peers_common import (  # noqa: E402
    BATCH_SIZE,
    batch_stream,
    first_order_step,
    get_values,
    load_lora_model,
    set_values,
)
from bench._peers_flower import run_flower_fedavg  # noqa: E402
from tests.harness import Tiny, make_tiny  # noqa: E402

LR = 0.05
LOCAL_STEPS = 2
ROUNDS = 2
# Per message, what gRPC/HTTP2 and protobuf add to the np.save bytes is a few hundred
# bytes; the connection's preface, settings and pings a few more. Generous, but far
# below a second copy of the payload.
OVERHEAD = 4096


def client_records() -> list[list[dict[str, str]]]:
    sums = [{"instruction": f"What is {i} plus {i + 3}?", "response": f"{2 * i + 3}"} for i in range(8)]
    words = [{"instruction": f"Spell the number {i} backwards.", "response": str(i)[::-1] + " reversed"}
             for i in range(10, 18)]
    return [sums, words]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def recompute(tiny: Tiny, records: list[list[dict[str, str]]], rounds: int) -> dict[str, Any]:
    """What FedAvg over the clients should give, recomputed in this process with the
    helpers the clients use: each client keeps its batch stream across rounds, starts
    each round from the global values, takes LOCAL_STEPS SGD steps; the global values
    are the examples-weighted mean."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the clients run; closer sums
    try:
        lora = load_lora_model(str(tiny.directory))
        streams = [batch_stream(lora, share, f"client-{i}") for i, share in enumerate(records)]
        initial = get_values(lora)
        current = initial
        per_round: list[dict[str, Any]] = []
        for _ in range(rounds):
            locals_, losses, examples = [], [], []
            for stream in streams:
                set_values(lora, current)
                optimizer = torch.optim.SGD(lora.parameters, lr=LR)
                batches = [stream.next_batch() for _ in range(LOCAL_STEPS)]
                losses.append(float(np.mean([first_order_step(lora, optimizer, b) for b in batches])))
                examples.append(sum(int(b.input_ids.shape[0]) for b in batches))
                locals_.append(get_values(lora).astype(np.float64))
            weights = np.asarray(examples, dtype=np.float64) / sum(examples)
            mean = sum(w * v for w, v in zip(weights, locals_, strict=True))
            per_round.append({"start": current, "locals": locals_, "mean": mean, "losses": losses,
                              "examples": examples})
            current = mean.astype(np.float32)
        return {"initial": initial, "rounds": per_round}
    finally:
        torch.set_num_threads(threads)


def test_fedavg_rounds_match_the_clients_local_steps_and_bytes_are_measured(tiny: Tiny, tmp_path: Path) -> None:
    records = client_records()
    handler = signal.getsignal(signal.SIGINT)
    result = run_flower_fedavg(tmp_path / "out", records, learning_rate=LR, local_steps=LOCAL_STEPS,
                               wall_budget_s=3600, max_rounds=ROUNDS, model_source=str(tiny.directory))

    # Nothing left behind: the client processes are gone, the signal handler is back.
    assert alive(result["client_pids"]) == []
    assert [p.pid for p in psutil.Process().children(recursive=True) if p.pid in result["client_pids"]] == []
    assert result["client_exit_codes"] == [0, 0]
    assert signal.getsignal(signal.SIGINT) is handler

    assert result["contender"] == "flower-fedavg-lora" and result["stopped_by"] == "max_rounds"
    assert json.loads((tmp_path / "out" / "flower.json").read_text()) == json.loads(json.dumps(result))
    assert [r["round"] for r in result["rounds"]] == [1, 2]

    expected = recompute(tiny, records, ROUNDS)
    initial = np.load(result["initial_checkpoint"])
    # The server got the initial values from a client: the federation's initial adapters.
    assert initial.dtype == np.float32 and np.array_equal(initial, expected["initial"])
    parameters = result["parameter_count"]
    assert parameters == initial.size == result["payload_bytes"] // 4

    for got, want in zip(result["rounds"], expected["rounds"], strict=True):
        values = np.load(got["checkpoint"])
        assert values.dtype == np.float32 and values.shape == (parameters,)
        assert got["client_examples"] == want["examples"] == [LOCAL_STEPS * BATCH_SIZE] * 2
        # The test can tell the outcomes apart: the round moved the values, and the two
        # clients' updates differ, by far more than the tolerance.
        tolerance = 1e-6
        assert np.abs(want["mean"] - want["start"]).max() > 100 * tolerance
        assert np.abs(want["locals"][0] - want["locals"][1]).max() > 100 * tolerance
        np.testing.assert_allclose(values, want["mean"], rtol=1e-4, atol=tolerance)
        for local in want["locals"]:  # the aggregate is not one client's result
            assert np.abs(values - local).max() > 10 * tolerance
        np.testing.assert_allclose(got["client_losses"], want["losses"], rtol=1e-4)

    # Training time: positive, increasing.
    times = [r["train_s"] for r in result["rounds"]]
    assert 0 < times[0] < times[1]

    # Bytes: every client gets the payload down and sends it up each round, plus framing;
    # round 1's uploads also carry the initial values (one client's).
    payload = 4 * parameters
    previous_up, previous_down = [0, 0], [0, 0]
    for number, got in enumerate(result["rounds"], start=1):
        up, down = got["up_bytes_by_client"], got["down_bytes_by_client"]
        assert got["up_bytes_per_client"] == pytest.approx(np.mean(up))
        assert got["down_bytes_per_client"] == pytest.approx(np.mean(down))
        for client in range(2):
            sent_down = down[client] - previous_down[client]
            sent_up = up[client] - previous_up[client]
            assert payload <= sent_down <= payload + OVERHEAD
            assert payload <= sent_up <= (2 if number == 1 else 1) * payload + OVERHEAD
        if number == 1:
            assert sum(up) >= 3 * payload
        previous_up, previous_down = up, down
    assert result["peak_client_rss_bytes"] == max(result["peak_rss_bytes_by_client"]) > 10 * 2**20


def test_the_wall_budget_stops_after_the_round_that_reaches_it(tiny: Tiny, tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run_flower_fedavg(tmp_path / "out", client_records(), learning_rate=LR, local_steps=1,
                               wall_budget_s=0, max_rounds=10_000, model_source=str(tiny.directory))
    # The 9,999 rounds after the budget are empty: the run ends in seconds.
    assert time.perf_counter() - started < 60
    assert result["stopped_by"] == "budget"
    assert [r["round"] for r in result["rounds"]] == [1]
    assert sorted(p.name for p in (tmp_path / "out").glob("round-*.npy")) == ["round-0000.npy", "round-0001.npy"]
    assert alive(result["client_pids"]) == []


def test_a_failing_client_stops_the_run_with_its_error(tiny: Tiny, tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # A NaN learning rate: the first step's loss is finite, the second's is not, and the
    # client's helper raises, which crashes a legacy Flower client.
    with pytest.raises(RuntimeError, match=r"(?s)round 1: 0 of 2 clients.*the loss is not finite"):
        run_flower_fedavg(tmp_path / "out", client_records(), learning_rate=math.nan, local_steps=2,
                          wall_budget_s=3600, max_rounds=10_000, model_source=str(tiny.directory))
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()
    assert not list((tmp_path / "out").glob("round-0001.npy"))
