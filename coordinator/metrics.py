"""The coordinator's Prometheus metrics (``GET /metrics``), kept with ``prometheus-client``.

Each :class:`CoordinatorMetrics` owns its own registry rather than the library's global
one: a process (the test suite, an embedding app) may run several coordinators, and each
must report its own federation. The coordinator calls the ``on_*`` methods where things
happen; gauges that mirror live state (clients connected, the committed round) are read
when scraped, so they cannot drift from what ``/status`` shows.

Names follow Prometheus' conventions: ``edgefed_`` prefix, base units (seconds, bytes),
``_total`` on counters (the library appends it).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "CoordinatorMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# A round spans the clients' training: seconds to tens of minutes on the devices we target.
ROUND_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A ledger commit is one SQLite transaction: sub-millisecond to a slow disk's second.
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class CoordinatorMetrics:
    """The metrics of one coordinator, in a registry of their own.

    Args:
        clients_connected: returns (training clients, observers) connected now.
        clients_flagged: returns the connected clients flagged now.
        committed_round: returns the ledger's last committed round.
        dashboard_viewers: returns the open live-page connections.
    """

    def __init__(self, *, clients_connected: Callable[[], tuple[int, int]], clients_flagged: Callable[[], int],
                 committed_round: Callable[[], int], dashboard_viewers: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.rounds_committed = Counter("edgefed_rounds_committed", "Rounds committed to the ledger by this process",
                                        registry=registry)
        self.attempts_abandoned = Counter("edgefed_round_attempts_abandoned",
                                          "Round attempts abandoned (quorum not met, aggregation or commit failed)",
                                          ["reason"], registry=registry)
        self.round_duration = Histogram("edgefed_round_duration_seconds",
                                        "From handing out a committed attempt's tasks to its commit",
                                        buckets=ROUND_BUCKETS_S, registry=registry)
        self.updates_accepted = Counter("edgefed_updates_accepted", "Updates accepted into an open round",
                                        registry=registry)
        self.updates_refused = Counter("edgefed_updates_refused",
                                       "Updates refused, by the error code sent back (PROTOCOL.md §7.2)",
                                       ["reason"], registry=registry)
        self.wire_bytes = Counter("edgefed_wire_bytes",
                                  "Bytes on the coordinator's sockets (websocket frames and HTTP, below TLS)",
                                  ["direction"], registry=registry)
        self.ledger_commit = Histogram("edgefed_ledger_commit_seconds", "Time to write a round to the ledger",
                                       buckets=COMMIT_BUCKETS_S, registry=registry)
        self.connections_refused = Counter(
            "edgefed_connections_refused",
            "Connections reset by the connection caps: 'address_cap' refused at accept (every connection of the "
            "address said hello), 'evicted' an older connection that had not said hello, dropped to make room",
            ["reason"], registry=registry)
        self.fingerprint_mismatches = Counter("edgefed_fingerprint_mismatches",
                                              "Clients newly flagged: their fingerprint differed from the majority's",
                                              registry=registry)
        # The up/down children, looked up once: the byte counters are bumped on every socket read and write.
        self.bytes_in = self.wire_bytes.labels(direction="in")
        self.bytes_out = self.wire_bytes.labels(direction="out")

        connected = Gauge("edgefed_clients_connected", "Clients connected and welcomed now", ["kind"],
                          registry=registry)
        connected.labels(kind="training").set_function(lambda: clients_connected()[0])
        connected.labels(kind="observer").set_function(lambda: clients_connected()[1])
        Gauge("edgefed_clients_flagged", "Connected clients flagged by the fingerprint check now",
              registry=registry).set_function(clients_flagged)
        Gauge("edgefed_committed_round", "The ledger's last committed round",
              registry=registry).set_function(committed_round)
        Gauge("edgefed_dashboard_viewers", "Open live-page connections", registry=registry
              ).set_function(dashboard_viewers)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
