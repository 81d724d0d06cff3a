"""``edgefed-client``: run an edge client daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from edge_client.daemon import ClientConfig, EdgeClient, FatalClientError, client_threads, plan_training
from edge_client.data import DataError
from edge_client.device import detect_device, parse_bytes, parse_headroom
from edge_client.engines.registry import UnknownModeError
from edge_client.identity import IdentityError
from edge_client.model import DEFAULT_MODEL, ModelLoadError


# The coordinator's default (coordinator/config.py), which edge_client may not import.
DEFAULT_REBASE_EVERY = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefed-client", description=__doc__)
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="coordinator websocket URL")
    parser.add_argument("--client-id", help="this client's name (letters, digits, _.-)")
    parser.add_argument("--data", help="JSONL file of instruction/response records")
    parser.add_argument("--print-model-hash", action="store_true",
                        help="print the base-weights hash of --model (for the federation config) and exit")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="builtin name, .gguf file or HF model directory")
    parser.add_argument("--mode", default="auto",
                        help="auto (the best mode that fits the memory budget), a mode to force, "
                             "or observe")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--memory-budget", default=None,
                        help="memory training may use, e.g. 6GiB (default: the device's free memory)")
    parser.add_argument("--memory-headroom", default="10%",
                        help="share of the budget kept free of the estimated peak (default 10%%)")
    parser.add_argument("--plan", action="store_true",
                        help="print the device, its budget and the mode and batch this client would choose "
                             "for --batch/--seq-len/--scope, then exit (loads no weights)")
    parser.add_argument("--batch", type=int, default=8, help="with --plan: examples per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="with --plan: tokens per example (default 256)")
    parser.add_argument("--scope", default="full", choices=["full", "lora"], help="with --plan: trained parameters")
    parser.add_argument("--rebase-every", type=int, default=DEFAULT_REBASE_EVERY,
                        help="with --plan: the federation's rebase interval, which decides whether a "
                             f"round-start snapshot is kept (default {DEFAULT_REBASE_EVERY})")
    parser.add_argument("--cache-dir", default=None, help="model cache (default $EDGEFED_CACHE or ~/.cache/edgefed)")
    parser.add_argument("--copies", default="auto", choices=["auto", "memory", "file"],
                        help="where the base copy and round-start snapshot live: auto (a file under "
                             "<cache-dir>/copies for a CPU client training the whole model, else memory); "
                             "in memory on a CPU or MPS device they count against the budget (--plan too)")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "plain", "chat"],
                        help="prompt layout; auto = the model's chat template if it has one")
    parser.add_argument("--on-bad-record", default="skip", choices=["skip", "raise"],
                        help="a malformed data line: report it and skip it, or refuse the file")
    parser.add_argument("--instruction-field", default="instruction")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--key", default=None,
                        help="this client's private key file (edgefed-keys new); signs hellos and updates")
    parser.add_argument("--ca-file", default=None,
                        help="the federation's ca.pem, to verify a wss:// coordinator (default: system CAs)")
    parser.add_argument("--emulator", default=None, metavar="DIR",
                        help="a FedBiOT emulator (edgefed-emulator build) of the model: the chooser trains "
                             "through it (mode fedbiot, or fedbiot_zo for the smallest budgets) when the memory budget fits "
                             "nothing else")
    parser.add_argument("--emulator-quantization", default="auto", choices=["auto", "nf4", "int8", "none"],
                        help="how the emulator's frozen part is held (auto: 8 bits where the budget holds "
                             "them, else 4)")
    parser.add_argument("--log-level", default="INFO")
    return parser


ClientFactory = Callable[[ClientConfig, argparse.Namespace], EdgeClient]


def main(argv: list[str] | None = None, *, parser: argparse.ArgumentParser | None = None,
         make_client: ClientFactory | None = None) -> int:
    """Run a client. ``parser`` and ``make_client`` let a variant (edge_client/adversary.py)
    add flags and build its own :class:`EdgeClient` subclass."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.print_model_hash:
        return _print_model_hash(args.model, args.cache_dir)
    if args.plan:
        return _print_plan(args)
    if not args.client_id or not args.data:
        parser.error("--client-id and --data are required")
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {args.client_id} %(levelname)s %(message)s")
    client_threads()
    try:
        budget = parse_bytes(args.memory_budget) if args.memory_budget else None
        config = ClientConfig(url=args.url, client_id=args.client_id, data_path=args.data, model=args.model,
                              mode=args.mode, device=args.device, memory_budget_bytes=budget,
                              memory_headroom=parse_headroom(args.memory_headroom),
                              cache_dir=args.cache_dir, copies=args.copies,
                              instruction_field=args.instruction_field, response_field=args.response_field,
                              prompt_format=args.prompt_format, on_bad_record=args.on_bad_record,
                              key_path=args.key, ca_file=args.ca_file, emulator=args.emulator,
                              emulator_quantization=args.emulator_quantization)
        client = make_client(config, args) if make_client is not None else EdgeClient(config)
        client.prepare()
        asyncio.run(client.run(handle_signals=True))
    except (ValueError, ModelLoadError, DataError, UnknownModeError, FatalClientError, IdentityError) as error:
        print(f"edgefed-client: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _print_plan(args: argparse.Namespace) -> int:
    """``--plan``: what this device offers and what the chooser would run on it."""
    import json
    from pathlib import Path

    from edge_client.model import resolve_model
    from profiles.chooser import ModeUnavailable, NoModeFits, TrainingTask
    from profiles.estimator import ModelShape

    try:
        if args.rebase_every < 1:
            raise ValueError(f"--rebase-every must be >= 1, got {args.rebase_every}")
        budget = parse_bytes(args.memory_budget) if args.memory_budget else None
        report = detect_device(args.device, memory_budget_bytes=budget,
                               headroom=parse_headroom(args.memory_headroom))
        model_dir = resolve_model(args.model, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
        config_file = Path(model_dir) / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{model_dir}: no config.json to read the model's shape from")
        shape = ModelShape.from_hf_config(json.loads(config_file.read_text(encoding="utf-8")))
        task = TrainingTask(scope=args.scope, batch_size=args.batch, max_seq_len=args.seq_len)
        print(report.describe())
        manifest = None
        if args.emulator is not None:
            from edge_client.emulator import EmulatorLoadError, read_manifest

            try:
                manifest = read_manifest(args.emulator)
            except EmulatorLoadError as error:
                raise ValueError(str(error)) from None
        choice = plan_training(shape, task, report, copies=args.copies, rebase_every=args.rebase_every,
                               mode=args.mode, emulator=manifest)
    except (ValueError, ModelLoadError, NoModeFits, ModeUnavailable) as error:
        print(f"edgefed-client: {error}", file=sys.stderr)
        return 2
    print(f"plan: {choice.explanation}")
    if choice.estimate is not None:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in choice.estimate.breakdown.items() if v)
        print(f"  estimated peak by part (GiB): {parts}")
    return 0


def _print_model_hash(model: str, cache_dir: str | None) -> int:
    from pathlib import Path

    from edge_client.model import base_weights_hash, load_model, resolve_model

    try:
        loaded, _ = load_model(resolve_model(model, cache_dir=Path(cache_dir) if cache_dir else None))
    except ModelLoadError as error:
        print(f"edgefed-client: {error}", file=sys.stderr)
        return 2
    print(base_weights_hash(loaded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
