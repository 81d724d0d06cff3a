"""``edgefed-coordinator``: host a federation."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from coordinator.allowlist import AllowlistError, load_allowlist
from coordinator.config import ConfigError, load_config
from coordinator.ledger import Ledger, LedgerError
from coordinator.server import Coordinator
from coordinator.tls import TlsError, server_ssl_context

# CLI flag -> FederationConfig field
_OVERRIDES = {
    "federation_id": str, "model_name": str, "model_hash": str, "scope": str, "seed_pool_size": int,
    "rebase_every": int, "pool_key": int, "perturbation": str, "learning_rate": float, "epsilon": float, "local_steps": int,
    "batch_size": int, "max_seq_len": int, "rounds": int, "clients_per_round": int, "quorum": int,
    "min_clients": int, "deadline_s": float, "commit_wait_s": float, "ledger_path": str, "host": str,
    "port": int, "lora_rank": int, "lora_init_seed": int, "allowlist": str, "tls_cert": str, "tls_key": str,
    "aggregation": str, "aggregation_trim": float, "aggregation_clip": float, "aggregation_max_examples": int,
    "max_connections_per_address": int, "max_connections_in_handshake": int,
    "personalised_lr": str, "personalised_lr_spread": float,
}
_HELP = {
    "personalised_lr": "FedMeZO's personalised client-wise learning rates from each client's last_loss, mean_loss "
                       "or update_size (default off: one rate)",
    "personalised_lr_spread": "the personalised rates stay within learning_rate x (1 +- this); default 0.5",
    "quorum": "updates a round needs to commit at its deadline (default: a majority of --clients-per-round, "
              "and at least 3 where it allows under a robust aggregation)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefed-coordinator", description=__doc__)
    parser.add_argument("--config", type=Path, help="federation TOML file (see coordinator/config.py)")
    for name, kind in _OVERRIDES.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                            help=_HELP.get(name, f"override {name}"))
    parser.add_argument("--read-token", dest="read_token", default=None,
                        help="token the page, /status and /metrics require (?token= or Authorization: Bearer); "
                             "default: $EDGEFED_READ_TOKEN, else [server] read_token, else none in open mode and "
                             "a generated one (logged) in allow-list mode")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="serve plain ws:// even on a non-loopback host (not recommended)")
    parser.add_argument("--port-file", type=Path, help="write the listening port here once serving")
    parser.add_argument("--status-file", type=Path, help="write the final status JSON here on exit")
    parser.add_argument("--log-level", default="INFO")
    return parser


async def _serve(coordinator: Coordinator, port_file: Path | None, status_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, coordinator.stop)
    runner = asyncio.create_task(coordinator.run())
    while coordinator.port is None and not runner.done():
        await asyncio.sleep(0.05)
    if port_file is not None and coordinator.port is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(coordinator.port))
        tmp.replace(port_file)
    await runner
    if status_file is not None:
        status_file.write_text(json.dumps(coordinator.final_status or coordinator.status(), indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s coordinator %(levelname)s %(message)s")
    overrides = {name: getattr(args, name) for name in _OVERRIDES}
    overrides["insecure"] = args.insecure
    # The environment keeps the secret out of `ps`; a flag beats it, the config file yields to both.
    overrides["read_token"] = args.read_token or os.environ.get("EDGEFED_READ_TOKEN") or None
    try:
        config = load_config(args.config, overrides)
        allowlist = load_allowlist(config.allowlist) if config.allowlist else None
        ssl_context = server_ssl_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        with Ledger(config.ledger_path) as ledger:
            coordinator = Coordinator(config, ledger, allowlist=allowlist, ssl_context=ssl_context)
            asyncio.run(_serve(coordinator, args.port_file, args.status_file))
    except (ConfigError, LedgerError, AllowlistError, TlsError) as error:
        print(f"edgefed-coordinator: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"edgefed-coordinator: cannot listen on {args.host or '127.0.0.1'}:{args.port}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
