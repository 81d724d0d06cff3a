"""edgefed-sim: the population is deterministic and says what it is; a host plays many
clients on one model copy against a real coordinator, bit-exact with a real client; and
the command runs on a Ray cluster (a one-node one, started with ``ray start``)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.daemon import ClientConfig, EdgeClient
from simulation.population import PopulationError, PopulationSettings, build_population, parse_device_mix
from tests.harness import coordinator, make_tiny, until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def records(count: int) -> list[dict]:
    families = ("math", "geography", "spelling")
    return [{"instruction": f"What is {i % 17} plus {i % 13}?", "response": f"{i % 17 + i % 13}",
             "family": families[i % 3]} for i in range(count)]


def test_the_same_seed_gives_the_same_population_and_schedule():
    settings = PopulationSettings(clients=200, availability=0.2, churn=0.3, attackers=0.1, heldout=20,
                                  latency_median_s=2.0, device_mix=parse_device_mix("1GiB:0.25,8GiB:0.75"), seed=7)
    first, heldout = build_population(records(600), settings)
    again, heldout_again = build_population(records(600), settings)
    other, _ = build_population(records(600), PopulationSettings(**{**settings.__dict__, "seed": 8}))
    describe = lambda clients: [(c.client_id, c.records, c.device.name, c.attacker,  # noqa: E731
                                 [c.online(r) for r in range(10)], c.latency_s(3)) for c in clients]
    assert describe(first) == describe(again) and heldout == heldout_again
    assert describe(first) != describe(other)
    # The shares hold exactly, and every client has data.
    assert sum(c.device.name == "8GiB" for c in first) == 150 and sum(c.attacker for c in first) == 20
    assert all(c.records for c in first) and len(heldout) == 20
    # Availability is the long-run share online, and churn moves clients in and out.
    online = [sum(c.online(r) for c in first) / len(first) for r in range(40)]
    assert 0.12 < sum(online) / len(online) < 0.28
    assert any(first[i].online(r) != first[i].online(r + 1) for i in range(50) for r in range(5))
    assert all(c.latency_s(1) > 0 for c in first)


@pytest.mark.parametrize("changes, why", [
    ({"churn": 0.9, "availability": 0.6}, "too high to keep availability"),
    ({"availability": 0.0}, "availability"),
    ({"attack": "bribe"}, "unknown attack"),
    ({"clients": 0}, "clients"),
])
def test_impossible_populations_are_refused_with_a_reason(changes, why):
    with pytest.raises(PopulationError, match=why):
        PopulationSettings(**{"clients": 10, **changes})


def test_device_mixes_read_sizes_and_the_device_table():
    mix = parse_device_mix("0.75GiB:1, Jetson Orin 8 GiB:3")
    assert [(c.name, c.share) for c in mix] == [("0.75GiB", 0.25), ("Jetson Orin 8 GiB", 0.75)]
    assert mix[1].budget_bytes == 6 * 1024**3
    for bad in ("lots:1", "4GiB", "4GiB:-1", ""):
        with pytest.raises(PopulationError):
            parse_device_mix(bad)


def test_hosts_play_many_clients_on_one_copy_each_bit_exact_with_a_real_client(tmp_path):
    """Two hosts (two model copies) play 12 clients with churn, stragglers and attackers;
    every round's fingerprints agree, and equal a real client's (an observer daemon)."""
    from simulation.host import SimHost

    tiny = make_tiny(tmp_path / "tiny")
    settings = PopulationSettings(clients=12, availability=0.6, churn=0.3, attackers=0.25, attack="sign_flip",
                                  heldout=10, latency_median_s=0.05, device_mix=parse_device_mix("4GiB:1"), seed=3)
    clients, _ = build_population(records(120), settings)
    rounds = 4

    async def body() -> tuple[dict, list[dict], str, str]:
        async with coordinator(tmp_path, tiny, max_seq_len=128, rounds=rounds, min_clients=3, clients_per_round=4,
                               quorum=3, commit_wait_s=5, deadline_s=60) as server:
            url = f"ws://127.0.0.1:{server.port}"
            observer = EdgeClient(ClientConfig(url=url, client_id="observer", data_path=None,
                                               model=str(tiny.directory), mode="observe"))
            observer.prepare()
            watching = asyncio.create_task(observer.run())
            hosts = [SimHost(url=url, model=str(tiny.directory), mode="mezo", clients=clients[i::2],
                             final_round=rounds) for i in range(2)]
            for host in hosts:
                host.load()
            results = await asyncio.wait_for(asyncio.gather(*(host.run() for host in hosts)), 240)
            await asyncio.wait_for(watching, 60)
            status = server.final_status or server.status()
            assert observer.sync is not None and hosts[0].replica is not None
            return status, results, observer.sync.space.fingerprint(), hosts[0].replica.fingerprint()

    status, results, observer_fingerprint, host_fingerprint = asyncio.run(body())
    committed = status["rounds"]
    assert [r["round"] for r in committed] == list(range(1, rounds + 1))
    assert all(r["fingerprints"] == 1 for r in committed)  # every replica, hosts' and observer's, agrees
    assert observer_fingerprint == host_fingerprint
    reporters = {cid for r in committed for cid in r["fingerprint_reports"]}
    assert len(reporters - {"observer"}) > 4  # many virtual clients, two model copies
    assert sum(r["went_offline"] for r in results if "went_offline" in r) > 0  # churn happened
    assert sum(r.get("attacks_sent", 0) for r in results) + sum(r.get("honest_updates_sent", 0) for r in results) >= \
        sum(r["num_updates"] for r in committed)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.integration
def test_edgefed_sim_runs_on_a_ray_cluster(tmp_path):
    """`ray start --head`, then edgefed-sim --address: the documented cluster path."""
    pytest.importorskip("ray")
    tiny = make_tiny(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    ray_bin = str(BIN / "ray")
    subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120)
    try:
        run = subprocess.run(
            [str(BIN / "edgefed-sim"), "--address", f"127.0.0.1:{port}", "--model", str(tiny.directory),
             "--clients", "40", "--availability", "0.4", "--churn", "0.2", "--attackers", "0.1", "--rounds", "2",
             "--clients-per-round", "3", "--actors", "2", "--heldout", "16", "--scope", "full",
             "--run-dir", str(tmp_path / "run"), "--log-level", "WARNING"],
            capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["virtual_clients"] == 40 and summary["model_copies"] == 2
    assert summary["fingerprints_agree"] is True
    assert summary["eval_loss_before"] is not None and summary["eval_loss_after"] is not None
    assert summary["peak_rss_mb"] > 0 and summary["coordinator_rss_mb"] > 0
    assert "online" in run.stdout  # progress as the coordinator saw it


@pytest.mark.parametrize("argv, says", [
    (["--clients", "0"], "clients must be >= 1"),
    (["--device-mix", "lots:1"], "neither a memory size"),
    (["--data", "/nonexistent.jsonl"], "data file not found"),
    (["--clients", "20", "--heldout", "4", "--url", "ws://127.0.0.1:1"], "cannot reach the coordinator"),
])
def test_edgefed_sim_refuses_bad_input_in_one_line(tmp_path, capsys, argv, says):
    from simulation.cli import main

    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
