"""The public SDK (``edgefed``): an embedded client and a hosted coordinator, on the tiny
model over real websockets on 127.0.0.1.

The README's example runs here exactly as printed (extracted from README.md), so it
cannot rot; the other tests hold the SDK to what the README promises: callbacks in the
documented order on the documented thread, ``stop()`` leaving no thread or socket, data
from any iterable, an app's own model checked against the federation's hash.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import edgefed
from edge_client.data import DataError, records_from
from edge_client.model import base_weights_hash, load_model
from edge_client.tiny import make_tiny_llama
from edgefed import Client, Coordinator, FatalClientError

ROOT = Path(__file__).resolve().parents[1]
LOCAL_STEPS = 3
RECORDS = [{"instruction": f"Add {i} and {i}.", "response": f"{2 * i}"} for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = make_tiny_llama(tmp_path_factory.mktemp("sdk") / "tiny")
    model, _ = load_model(directory)
    return {"dir": directory, "hash": base_weights_hash(model)}


def host(tiny: dict[str, Any], tmp_path: Path, rounds: int, **overrides: Any) -> Coordinator:
    """A one-client federation on the tiny model, configured as the TOML's tables."""
    tables = {
        "federation": {"id": "sdk-test", "rounds": rounds, "ledger": str(tmp_path / "ledger.db")},
        "model": {"name": "tiny", "hash": tiny["hash"]},
        "training": {"scope": "lora", "seed_pool_size": 64, "local_steps": LOCAL_STEPS, "batch_size": 2,
                     "max_seq_len": 64, "learning_rate": 1e-3, "aggregation": "mean"},
        "rounds": {"clients_per_round": 1, "quorum": 1, "min_clients": 1, "deadline_s": 60},
        "modes": {"ferret": {"local_steps": LOCAL_STEPS, "seeds": 16}},  # the mode the chooser picks here
    }
    return Coordinator(tables, port=0, **overrides)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- sdk-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its SDK example"
    return match.group(1)


def test_the_readme_example_is_at_most_ten_lines_and_runs_against_a_live_coordinator(tiny, tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 10
    with host(tiny, tmp_path, rounds=2) as coordinator:
        env = {**os.environ, "EDGEFED_URL": coordinator.url or "", "EDGEFED_MODEL": str(tiny["dir"]),
               "HF_HUB_OFFLINE": "1", "EDGEFED_CACHE": str(tmp_path / "cache"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert coordinator.wait(60)
        status = coordinator.status()
    assert status["round"] == 2 and status["finished"]
    lines = result.stdout.splitlines()
    for round_number in (1, 2):
        steps = [line for line in lines if line.startswith(f"round {round_number}: step ")]
        assert [line.split(",")[0] for line in steps] == \
            [f"round {round_number}: step {s}/{LOCAL_STEPS}" for s in range(1, LOCAL_STEPS + 1)]
        assert any(re.fullmatch(rf"round {round_number}: sent \d+ values", line) for line in lines), lines


def test_callbacks_fire_in_the_documented_order_on_the_clients_thread(tiny, tmp_path):
    events: list[tuple[str, str, Any]] = []

    def recorder(name: str):  # type: ignore[no-untyped-def]
        return lambda event: events.append((name, threading.current_thread().name, event))

    model, tokenizer = load_model(tiny["dir"])  # the app's own objects
    with host(tiny, tmp_path, rounds=2) as coordinator:
        client = Client(coordinator.url or "", "app-1", iter(RECORDS), model=model, tokenizer=tokenizer,
                        cache_dir=tmp_path / "cache",
                        **{name: recorder(name) for name in
                           ("on_plan", "on_sync", "on_round_start", "on_step", "on_round_end")})
        client.start()
        assert client.wait(300)
    assert client.finished and client.round == 2 and client.rounds_trained == 2
    assert {thread for _, thread, _ in events} == {"edgefed-client-app-1"}
    names = [name for name, _, _ in events]
    per_round = ["on_round_start", *["on_step"] * LOCAL_STEPS, "on_round_end", "on_sync"]
    assert names == ["on_plan", "on_sync", *per_round, *per_round]
    plan = events[0][2]
    assert plan.mode == "ferret" and plan.explanation == client.plan
    syncs = [event for name, _, event in events if name == "on_sync"]
    assert [(s.round, s.how) for s in syncs] == [(0, "current"), (1, "commit"), (2, "commit")]
    steps = [event for name, _, event in events if name == "on_step"]
    assert [(s.round, s.step, s.total) for s in steps] == \
        [(r, s, LOCAL_STEPS) for r in (1, 2) for s in range(1, LOCAL_STEPS + 1)]
    ends = [event for name, _, event in events if name == "on_round_end"]
    assert all(end.sent and end.scalars > 0 and end.error is None for end in ends)
    # the model object the app passed is the one trained (adapters added in place)
    assert client.model is not None and any("lora" in name for name, _ in client.model.named_parameters())


def _inet_connections() -> int:
    return len(psutil.Process().net_connections(kind="inet"))


def test_stop_leaves_no_thread_or_socket_open(tiny, tmp_path):
    threads_before = set(threading.enumerate())
    sockets_before = _inet_connections()
    first_round_done = threading.Event()
    with host(tiny, tmp_path, rounds=0) as coordinator:  # 0: until stopped
        client = Client(coordinator.url or "", "app-1", RECORDS, model=str(tiny["dir"]),
                        cache_dir=tmp_path / "cache", on_round_end=lambda event: first_round_done.set())
        client.start()
        assert first_round_done.wait(300)
        client.stop()
        assert client.wait(0)  # already joined by stop()
        client.stop()  # twice is harmless
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (set(threading.enumerate()) - threads_before
                                           or _inet_connections() > sockets_before):
        time.sleep(0.1)
    assert set(threading.enumerate()) - threads_before == set()
    assert _inet_connections() == sockets_before


def test_an_asyncio_app_awaits_run_beside_its_own_coordinator(tiny, tmp_path):
    async def app() -> tuple[int, int]:
        coordinator = host(tiny, tmp_path, rounds=1)
        serving = asyncio.create_task(coordinator.run())
        while coordinator.port is None:
            await asyncio.sleep(0.02)
        client = Client(coordinator.url or "", "app-1", RECORDS, model=str(tiny["dir"]),
                        cache_dir=tmp_path / "cache")
        await asyncio.wait_for(client.run(), 300)
        await asyncio.wait_for(serving, 60)
        return client.round, coordinator.status()["round"]

    assert asyncio.run(app()) == (1, 1)


def test_an_apps_model_with_other_weights_is_refused_before_training(tiny, tmp_path):
    other, tokenizer = load_model(make_tiny_llama(tmp_path / "other", seed=7))
    with host(tiny, tmp_path, rounds=1) as coordinator:
        client = Client(coordinator.url or "", "app-1", RECORDS, model=other, tokenizer=tokenizer,
                        cache_dir=tmp_path / "cache")
        client.start()
        with pytest.raises(FatalClientError, match="not the federation's base model"):
            client.wait(120)
        assert client.rounds_trained == 0


def test_a_half_precision_model_is_refused_with_what_to_do(tiny, tmp_path):
    import torch

    model, tokenizer = load_model(tiny["dir"], dtype=torch.bfloat16)
    client = Client("ws://127.0.0.1:9", "app-1", RECORDS, model=model, tokenizer=tokenizer)
    client.start()
    with pytest.raises(ValueError, match="must be float32.*dtype=torch.float32"):
        client.wait(60)


class _MapStyle:
    """A map-style torch Dataset shape: __len__ and __getitem__, no __iter__."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.rows[index]


class _Row:
    def __init__(self, instruction: str, response: str) -> None:
        self.instruction, self.response = instruction, response


def test_records_come_from_any_iterable_a_dataset_or_objects():
    import datasets
    import torch.utils.data

    class TorchDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(RECORDS)

        def __getitem__(self, index: int) -> dict[str, str]:
            if index >= len(RECORDS):
                raise IndexError(index)
            return RECORDS[index]

    expected = [(r["instruction"], r["response"]) for r in RECORDS]
    sources = [RECORDS, iter(RECORDS), (r for r in RECORDS), datasets.Dataset.from_list(RECORDS), TorchDataset(),
               _MapStyle(RECORDS), [_Row(r["instruction"], r["response"]) for r in RECORDS]]
    for source in sources:
        records, problems = records_from(source)
        assert [(r.instruction, r.response) for r in records] == expected and problems == [], type(source)


def test_bad_records_are_reported_like_bad_lines():
    records, problems = records_from([{"instruction": "a", "response": "b"}, {"instruction": "a"},
                                      {"instruction": "a", "response": 3}, {"instruction": "a", "response": " "}])
    assert len(records) == 1
    assert problems == ["record 2: missing field 'response'", "record 3: field 'response' must be a string, got int",
                        "record 4: empty response (field 'response')"]
    with pytest.raises(DataError, match="record 2: missing field"):
        records_from([{"instruction": "a", "response": "b"}, {"instruction": "a"}], on_error="raise")
    with pytest.raises(DataError, match="no usable records"):
        records_from([])
    with pytest.raises(DataError, match="iterable of records"):
        records_from(42)  # type: ignore[arg-type]


def test_client_arguments_are_checked_in_one_line():
    with pytest.raises(ValueError, match="data is required"):
        Client("ws://127.0.0.1:9", "a", None)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Client("ws://127.0.0.1:9", "a", RECORDS, model=object())
    with pytest.raises(ValueError, match="url must start with ws://"):
        Client("http://127.0.0.1:9", "a", RECORDS)


def test_the_coordinator_takes_the_tomls_tables_and_refuses_unknown_keys(tiny, tmp_path):
    with pytest.raises(edgefed.ConfigError, match="unknown key training.learnig_rate"):
        Coordinator({"model": {"hash": tiny["hash"]}, "training": {"learnig_rate": 1e-3}})
    toml = tmp_path / "federation.toml"
    toml.write_text(f'[model]\nhash = "{tiny["hash"]}"\n[federation]\nrounds = 3\n')
    assert Coordinator(toml, port=0).config.rounds == 3
    assert Coordinator({"model": {"hash": tiny["hash"]}, "federation": {"rounds": 3}}).config.rounds == 3


def test_the_public_api_type_checks():
    result = subprocess.run([sys.executable, "-m", "mypy", "-p", "edgefed"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
