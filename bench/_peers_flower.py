"""The federated baseline of ``bench/peers.py``: Flower's own FedAvg over its own gRPC
transport, training the same LoRA as this project's first-order clients.

What runs, and why this way:

* **The real thing.** The server is ``flwr.server.start_server`` with the stock
  ``flwr.server.strategy.FedAvg`` (subclassed only to watch: it waits for the clients,
  starts the clock, checkpoints and records, but the averaging is FedAvg's own). Each
  client is a separate Python process (``subprocess``) running ``start_client`` with a
  ``NumPyClient``. This is the legacy ("compat") API: deprecated since flwr 1.13 but
  still shipped in 1.42, and it is the gRPC bidi-stream transport that runs clients as
  real processes against an in-process server without a SuperLink/SuperNode deployment
  (no state database, no FAB packaging), so what is timed is training plus the wire.
* **The same work as a federation round.** A client keeps one ``batch_stream`` for the
  whole run (its batches continue across rounds), and on each ``fit`` loads the global
  adapters, takes ``local_steps`` plain SGD steps (a fresh optimizer each round, so no
  momentum/state outlives a round) and returns its adapters with ``num_examples`` =
  the examples it trained on. The adapters travel as ONE float32 array: the space's
  flat buffer (r = 8 on q_proj/v_proj), whole, each way, every round.
* **The server never loads the model.** ``initial_parameters`` is left ``None``, so
  FedAvg asks one client for them (Flower's default); those bytes are counted too.
* **Bytes are measured, not computed.** A small TCP relay in this process sits between
  each client and the gRPC server (one listening port per client) and counts the bytes
  it forwards each way: the TCP payload, so gRPC and HTTP/2 framing, headers, pings and
  window updates are included; TCP/IP headers are not.
* **Training time** starts at the first ``configure_fit`` (every client connected,
  i.e. loaded) and is read after each ``aggregate_fit``, less the time spent writing
  checkpoints. Once it reaches ``wall_budget_s`` the remaining rounds of the
  ``ServerConfig`` are no-ops (``configure_fit`` returns no clients, which the legacy
  ``Server`` treats as "skip this round"; the loop over empty rounds costs microseconds):
  the legacy ``Server.fit`` has no early exit short of reimplementing it.
* **It cannot hang.** The server waits for clients only while their processes live (and
  at most ``connect_timeout_s``); a round has ``round_timeout_s``; a failed ``fit`` (a
  client that died drops its stream, which fails the pending request) stops the run.
  Any of these makes :func:`run_flower_fedavg` raise, with the tail of the client's log;
  the client processes are always reaped (terminated if need be).

``start_server`` installs SIGINT/SIGTERM/SIGQUIT handlers, so :func:`run_flower_fedavg`
must be called from the main thread; it restores the previous handlers afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The benchmark must not phone home: Flower sends telemetry unless this is 0, and it
# reads the variable when flwr is first imported (the client processes inherit it).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import flwr  # noqa: E402
import numpy as np  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.common import Parameters, Scalar, parameters_to_ndarrays  # noqa: E402
from flwr.server import ServerConfig, start_server  # noqa: E402
from flwr.server.client_manager import ClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTENDER = "flower-fedavg-lora"
CONNECT_TIMEOUT_S = 300.0
ROUND_TIMEOUT_S = 600.0
JOIN_TIMEOUT_S = 30.0
FAILED_JOIN_TIMEOUT_S = 3.0
LOG_TAIL_CHARS = 3000

__all__ = ["run_flower_fedavg"]


# -- logging ---------------------------------------------------------------------------


class _DropLegacyApiNotice(logging.Filter):
    """Drops the deprecation banners of ``start_server``/``start_client``: this module uses
    the legacy API on purpose (see the module docstring) and prints them once per process."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "DEPRECATED FEATURE" not in text:
            return True
        detail = " ".join(str(a) for a in record.args or ())
        return "start_server()" not in detail and "start_client()" not in detail


def _quiet_flower(level: int) -> None:
    """Flower logs every message it sends and receives at INFO; keep ``level`` and up."""
    logger = logging.getLogger("flwr")
    logger.setLevel(level)
    if not any(isinstance(f, _DropLegacyApiNotice) for f in logger.filters):
        logger.addFilter(_DropLegacyApiNotice())


# -- the byte-counting relay -------------------------------------------------------------


class _CountingRelay:
    """One listening port per client on 127.0.0.1; each accepted connection is piped to
    the gRPC server, and the bytes read from each side are counted per client (``up``:
    client -> server, ``down``: server -> client). Counts are cumulative over every
    connection a client opens (gRPC may reconnect)."""

    def __init__(self, upstream: tuple[str, int], clients: int) -> None:
        self._upstream = upstream
        self._lock = threading.Lock()
        self._up = [0] * clients
        self._down = [0] * clients
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._listeners: list[socket.socket] = []
        for _ in range(clients):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            listener.settimeout(0.2)  # so the accept loop sees _stopping
            self._listeners.append(listener)
        self.ports = [listener.getsockname()[1] for listener in self._listeners]

    def start(self) -> None:
        for index, listener in enumerate(self._listeners):
            self._spawn(self._accept_loop, index, listener)

    def totals(self) -> tuple[list[int], list[int]]:
        """(up, down): the cumulative bytes of each client so far."""
        with self._lock:
            return list(self._up), list(self._down)

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = self._listeners + self._sockets
        for sock in sockets:
            _shutdown(sock)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"flower-relay-{target.__name__}")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, index: int, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            client.settimeout(None)
            try:
                server = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()  # the gRPC server is not up (yet): the client retries
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, client, server, index, True)
            self._spawn(self._pump, server, client, index, False)

    def _pump(self, source: socket.socket, sink: socket.socket, index: int, up: bool) -> None:
        counts = self._up if up else self._down
        try:
            while True:
                data = source.recv(1 << 18)
                if not data:
                    break
                with self._lock:
                    counts[index] += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:  # one side gone: end the connection both ways (unblocks the other pump)
            _shutdown(source)
            _shutdown(sink)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the client process ------------------------------------------------------------------


class _LoraClient(NumPyClient):
    """A Flower client training the federation's LoRA with plain SGD."""

    def __init__(self, index: int, lora: Any, stream: Any) -> None:
        self.index = index
        self.lora = lora
        self.stream = stream

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        from bench._peers_common import get_values

        return [get_values(self.lora)]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]
            ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        import torch

        from bench._peers_common import first_order_step, get_values, peak_rss_bytes_of_self, set_values

        if len(parameters) != 1:
            raise ValueError(f"expected the LoRA values as one array, got {len(parameters)} arrays")
        started = time.perf_counter()
        set_values(self.lora, parameters[0])
        optimizer = torch.optim.SGD(self.lora.parameters, lr=float(config["learning_rate"]))
        losses: list[float] = []
        examples = 0
        for _ in range(int(config["local_steps"])):
            batch = self.stream.next_batch()
            examples += int(batch.input_ids.shape[0])
            losses.append(first_order_step(self.lora, optimizer, batch))
        metrics: dict[str, Scalar] = {"client": self.index, "loss": float(np.mean(losses)),
                                      "peak_rss_bytes": peak_rss_bytes_of_self(),
                                      "fit_s": time.perf_counter() - started}
        return [get_values(self.lora)], examples, metrics


def _client_process() -> None:
    """A client process's body; its spec is the JSON file named by its first argument."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    _quiet_flower(int(spec["log_level"]))
    import torch
    from flwr.client import start_client

    from bench._peers_common import batch_stream, load_lora_model

    torch.set_num_threads(int(spec["threads"]))
    lora = load_lora_model(spec["model_source"], cache_dir=spec["cache_dir"])
    stream = batch_stream(lora, spec["records"], spec["stream_name"])
    client = _LoraClient(int(spec["index"]), lora, stream)
    start_client(server_address=spec["server_address"], client=client.to_client(),
                 max_wait_time=float(spec["connect_timeout_s"]))


def _stream_name(index: int, seed: int) -> str:
    """Seed 0 gives the batches a federation's client ``client-<index>`` draws."""
    return f"client-{index}" if seed == 0 else f"client-{index}-seed-{seed}"


class _Clients:
    """The client processes, their logs, and what to say when one fails."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.logs: list[Path] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, specs: Sequence[dict[str, Any]], threads: int) -> None:
        """One process per spec, its output to ``out_dir/client-<i>.log``."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        entry = "from bench._peers_flower import _client_process; _client_process()"
        for index, spec in enumerate(specs):
            spec_path = self.out_dir / f"client-{index}-spec.json"
            spec_path.write_text(json.dumps(spec))
            log = self.out_dir / f"client-{index}.log"
            self.logs.append(log)
            with log.open("wb") as sink:
                process = subprocess.Popen([sys.executable, "-c", entry, str(spec_path)], cwd=ROOT, env=env,
                                           stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
            self.processes.append(process)

    def dead(self) -> str | None:
        """A description of the clients that have exited, or None while all run."""
        gone = [(i, p.poll()) for i, p in enumerate(self.processes) if p.poll() is not None]
        if not gone:
            return None
        return "; ".join(f"client {i} exited with code {code}" for i, code in gone)

    def log_tails(self) -> str:
        parts = []
        for i, log in enumerate(self.logs):
            text = log.read_text(errors="replace") if log.exists() else ""
            if text.strip():
                parts.append(f"--- client {i} ({log}), last lines:\n{text[-LOG_TAIL_CHARS:]}")
        return "\n".join(parts)

    def reap(self, grace_s: float) -> list[int | None]:
        """Wait up to ``grace_s`` for the clients to exit, then end any left; their exit codes."""
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        return [p.returncode for p in self.processes]


# -- the strategy: FedAvg, watched -------------------------------------------------------


class _RecordingFedAvg(FedAvg):
    """Flower's FedAvg, unchanged in what it averages; around it: wait for every client,
    keep the training clock, checkpoint each round's aggregate, record bytes and losses,
    and stop at the budget (or on a failure) by configuring no more clients."""

    def __init__(self, *, clients: _Clients, relay: _CountingRelay, out_dir: Path, learning_rate: float,
                 local_steps: int, wall_budget_s: float, max_rounds: int, connect_timeout_s: float) -> None:
        count = len(clients.processes)
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=count, min_evaluate_clients=0,
                         min_available_clients=count, accept_failures=False,
                         on_fit_config_fn=lambda _round: {"learning_rate": learning_rate, "local_steps": local_steps},
                         fit_metrics_aggregation_fn=_mean_loss)
        self.clients = clients
        self.relay = relay
        self.out_dir = out_dir
        self.count = count
        self.wall_budget_s = wall_budget_s
        self.max_rounds = max_rounds
        self.connect_timeout_s = connect_timeout_s
        self.error: str | None = None
        self.stopped_by: str | None = None
        self.started: float | None = None
        self.excluded_s = 0.0
        self.parameter_count: int | None = None
        self.initial_checkpoint: Path | None = None
        self.rounds: list[dict[str, Any]] = []
        self.peak_rss: dict[int, int] = {}

    def _await_clients(self, client_manager: ClientManager) -> bool:
        """Every client connected; False (and ``error`` set) if one died or time ran out."""
        deadline = time.monotonic() + self.connect_timeout_s
        while client_manager.num_available() < self.count:
            dead = self.clients.dead()
            if dead is not None:
                self.error = f"{dead} (connected: {client_manager.num_available()} of {self.count})"
                return False
            if time.monotonic() > deadline:
                self.error = (f"only {client_manager.num_available()} of {self.count} clients connected within "
                              f"{self.connect_timeout_s:g} s")
                return False
            client_manager.wait_for(self.count, timeout=0.2)  # type: ignore[arg-type]
        return True

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        if not self._await_clients(client_manager):
            # Empty parameters, so the server asks no client; every round is then a no-op.
            return Parameters(tensors=[], tensor_type="numpy.ndarray")
        return super().initialize_parameters(client_manager)  # None: FedAvg asks a client

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, Any]]:
        if self.error is not None or self.stopped_by is not None:
            return []
        if not self._await_clients(client_manager):
            return []
        if self.started is None:
            arrays = parameters_to_ndarrays(parameters)
            if len(arrays) != 1 or arrays[0].dtype != np.float32 or arrays[0].ndim != 1:
                self.error = f"the initial parameters are not one flat float32 array: {[a.shape for a in arrays]}"
                return []
            self.parameter_count = int(arrays[0].size)
            self.initial_checkpoint = self.out_dir / "round-0000.npy"
            np.save(self.initial_checkpoint, arrays[0])
            self.started = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, Any]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures or len(results) != self.count:
            described = [repr(f) if isinstance(f, BaseException) else f"status {f[1].status}" for f in failures]
            self.error = (f"round {server_round}: {len(results)} of {self.count} clients returned an update; "
                          f"failures: {'; '.join(described) or 'none reported'}")
            return None, {}
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        assert self.started is not None and aggregated is not None
        train_s = time.perf_counter() - self.started - self.excluded_s
        bookkeeping = time.perf_counter()
        up, down = self.relay.totals()
        values = parameters_to_ndarrays(aggregated)[0].astype(np.float32, copy=False)
        checkpoint = self.out_dir / f"round-{server_round:04d}.npy"
        np.save(checkpoint, values)
        by_client = sorted(((int(r.metrics["client"]), r) for _, r in results), key=lambda pair: pair[0])
        for index, result in by_client:
            self.peak_rss[index] = max(self.peak_rss.get(index, 0), int(result.metrics["peak_rss_bytes"]))
        self.rounds.append({
            "round": server_round, "train_s": train_s,
            "up_bytes_per_client": float(np.mean(up)), "down_bytes_per_client": float(np.mean(down)),
            "up_bytes_by_client": up, "down_bytes_by_client": down, "checkpoint": str(checkpoint),
            "client_losses": [float(r.metrics["loss"]) for _, r in by_client],
            "client_examples": [int(r.num_examples) for _, r in by_client],
            "client_fit_s": [float(r.metrics["fit_s"]) for _, r in by_client],
            "loss": metrics.get("loss")})
        if train_s >= self.wall_budget_s:
            self.stopped_by = "budget"
        elif server_round >= self.max_rounds:
            self.stopped_by = "max_rounds"
        self.excluded_s += time.perf_counter() - bookkeeping
        return aggregated, metrics


def _mean_loss(pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    total = sum(n for n, _ in pairs)
    return {"loss": sum(n * float(m["loss"]) for n, m in pairs) / total} if total else {}


# -- the run -----------------------------------------------------------------------------


def run_flower_fedavg(out_dir: Path, client_records: list[list[dict[str, Any]]], *, learning_rate: float,
                      local_steps: int = 4, wall_budget_s: float, max_rounds: int,
                      model_source: str = "smollm2-135m", threads_per_client: int = 1,
                      cache_dir: str | None = None, seed: int = 0, round_timeout_s: float = ROUND_TIMEOUT_S,
                      connect_timeout_s: float = CONNECT_TIMEOUT_S, flower_log_level: int = logging.WARNING
                      ) -> dict[str, Any]:
    """Run Flower FedAvg-LoRA with one client process per entry of ``client_records``
    until ``wall_budget_s`` of training time has passed (checked after each round) or
    ``max_rounds``; checkpoint every round's aggregate to ``out_dir/round-NNNN.npy``
    (``round-0000.npy``: the initial adapters), write the result to
    ``out_dir/flower.json`` and return it (each client's output goes to
    ``out_dir/client-<i>.log``, its settings to ``client-<i>-spec.json``). ``seed`` varies
    the clients' batch order (seed 0: the federation clients' own). Raises RuntimeError
    if a client fails or never connects."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run_flower_fedavg must run in the main thread (flwr's start_server sets signal handlers)")
    if not client_records or any(not records for records in client_records):
        raise ValueError("every client needs at least one record")
    if max_rounds < 1 or local_steps < 1:
        raise ValueError("max_rounds and local_steps must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _quiet_flower(flower_log_level)

    server_port = _free_port()
    relay = _CountingRelay(("127.0.0.1", server_port), len(client_records))
    relay.start()
    specs = [{"index": i, "server_address": f"127.0.0.1:{port}", "records": records, "model_source": model_source,
              "cache_dir": cache_dir, "threads": threads_per_client, "stream_name": _stream_name(i, seed),
              "connect_timeout_s": connect_timeout_s, "log_level": flower_log_level}
             for i, (records, port) in enumerate(zip(client_records, relay.ports, strict=True))]
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
    clients = _Clients(out_dir)
    strategy: _RecordingFedAvg | None = None
    exit_codes: list[int | None] = []
    try:
        clients.start(specs, threads_per_client)
        strategy = _RecordingFedAvg(clients=clients, relay=relay, out_dir=out_dir, learning_rate=learning_rate,
                                    local_steps=local_steps, wall_budget_s=wall_budget_s, max_rounds=max_rounds,
                                    connect_timeout_s=connect_timeout_s)
        start_server(server_address=f"127.0.0.1:{server_port}", strategy=strategy,
                     config=ServerConfig(num_rounds=max_rounds, round_timeout=round_timeout_s))
    finally:
        # After a clean run the server has told every client to disconnect; otherwise
        # some may still be loading or retrying, and need not be waited for.
        clean = sys.exc_info()[0] is None and strategy is not None and strategy.error is None
        exit_codes = clients.reap(JOIN_TIMEOUT_S if clean else FAILED_JOIN_TIMEOUT_S)
        relay.close()
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    if strategy.error is not None or not strategy.rounds:
        raise RuntimeError(f"Flower FedAvg failed: {strategy.error or 'no round completed'}\n{clients.log_tails()}")

    assert strategy.parameter_count is not None and strategy.initial_checkpoint is not None
    result: dict[str, Any] = {
        "contender": CONTENDER, "flwr_version": flwr.__version__, "learning_rate": learning_rate,
        "local_steps": local_steps, "optimizer": "sgd", "clients": len(client_records),
        "threads_per_client": threads_per_client, "seed": seed, "wall_budget_s": wall_budget_s,
        "max_rounds": max_rounds, "parameter_count": strategy.parameter_count,
        "payload_bytes": 4 * strategy.parameter_count, "initial_checkpoint": str(strategy.initial_checkpoint),
        "rounds": strategy.rounds, "stopped_by": strategy.stopped_by or "max_rounds",
        "peak_client_rss_bytes": max(strategy.peak_rss.values()),
        "peak_rss_bytes_by_client": [strategy.peak_rss[i] for i in sorted(strategy.peak_rss)],
        "client_pids": [p.pid for p in clients.processes], "client_exit_codes": exit_codes,
        "bytes_note": ("cumulative TCP payload per client, counted at a relay in front of the gRPC server: the "
                       "parameters (np.save bytes in protobuf) plus gRPC/HTTP2 framing, headers and pings; "
                       "TCP/IP headers excluded; round 1 includes the initial parameters one client uploads"),
        "train_s_note": "from the first configure_fit (all clients loaded and connected), checkpoint writes excluded",
    }
    (out_dir / "flower.json").write_text(json.dumps(result, indent=2))
    return result
