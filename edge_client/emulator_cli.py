"""``edgefed-emulator``: build and inspect FedBiOT emulators (:mod:`edge_client.emulator`).

Subcommands::

    edgefed-emulator build --model SOURCE --out DIR [--ratio 0.5] [--adapter-layers 2]
                           [--steps 200] [--lr 1e-4] [--batch 4] [--seq-len 96]
                           [--records PATH] [--overwrite] [--cache-dir DIR]
    edgefed-emulator show DIR

``build`` is run once, by whoever hosts a federation, on any machine holding the full
model (never inside the coordinator). It prints one line per phase and a progress line
every few alignment steps, then a summary: the kept layers, the alignment loss before and
after, and the directory written.

The alignment records default to the shipped dataset's public part: the records that
``edgefed-local``'s default split (3 clients x 200 records, 64 held out, IID, seed 0)
leaves unused, so no client of such a federation trained on them and the evaluator never
scores them (:func:`edge_client.emulator.public_records`). ``--records`` takes any JSONL
of ``{"instruction", "response"}`` objects instead.

Bad input is reported in one line on stderr starting ``edgefed-emulator:``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NoReturn

from transformers.utils import logging as hf_logging

from edge_client.data import DataError, load_jsonl
from edge_client.emulator import (
    DEFAULT_ADAPTER_LAYERS,
    DEFAULT_DROP_RATIO,
    EmulatorError,
    build_emulator,
    read_manifest,
)
from edge_client.model import DEFAULT_MODEL, ModelLoadError

__all__ = ["build_parser", "main"]

PROG = "edgefed-emulator"

# At most this many progress lines per build (plus the first and the last step).
_PROGRESS_LINES = 20


class _Usage(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports errors in one line and raises instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``edgefed-emulator``."""
    parser = _Parser(prog=PROG, description="Build and inspect FedBiOT emulators (compressed, aligned "
                                            "stand-ins for the full model).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    build = commands.add_parser(
        "build", help="build an emulator of a model and align it by distillation on public records",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--model", default=DEFAULT_MODEL,
                       help="the full model: builtin name, .gguf file, HF model directory or hub id")
    build.add_argument("--out", required=True, type=Path, help="the emulator directory to write")
    build.add_argument("--ratio", type=float, default=DEFAULT_DROP_RATIO,
                       help="share of the layers below the adapter to drop, in [0, 1)")
    build.add_argument("--adapter-layers", type=int, default=DEFAULT_ADAPTER_LAYERS,
                       help="last decoder layers kept intact as the trainable adapter")
    build.add_argument("--steps", type=int, default=200, help="alignment (distillation) steps; 0: none")
    build.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the alignment")
    build.add_argument("--batch", type=int, default=4, help="records per alignment step")
    build.add_argument("--seq-len", type=int, default=96, help="tokens per record (longer ones are cut)")
    build.add_argument("--seed", type=int, default=0, help="seeds the held-aside records, batch order and torch")
    build.add_argument("--records", type=Path, default=None,
                       help="JSONL of instruction/response records to align on (default: the shipped "
                            "dataset's public part, which edgefed-local's default split gives no client)")
    build.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                       help="re-align against the federation's current adapter (FedBiOT's bi-level loop): the "
                            "adapter directory edgefed-export writes (<out>/adapter)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    build.add_argument("--cache-dir", type=Path, default=None,
                       help="GGUF conversion cache (default: $EDGEFED_CACHE or ~/.cache/edgefed)")

    show = commands.add_parser("show", help="print an emulator's manifest")
    show.add_argument("directory", type=Path, help="an emulator directory")
    return parser


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers' messages can span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _build(args: argparse.Namespace) -> int:
    records = None
    source = None
    if args.records is not None:
        records, _ = load_jsonl(args.records)
        source = str(args.records)
    started = time.perf_counter()
    every = max(1, args.steps // _PROGRESS_LINES)

    def progress(step: int, steps: int, loss: float) -> None:
        if step == 1 or step == steps or step % every == 0:
            print(f"  step {step:>5}/{steps}  loss {loss:.4f}  {time.perf_counter() - started:6.0f}s", flush=True)

    def stage(message: str) -> None:
        print(message, flush=True)

    manifest = build_emulator(
        args.model, args.out, adapter_layers=args.adapter_layers, drop_ratio=args.ratio,
        records=records, records_source=source, steps=args.steps, learning_rate=args.lr,
        batch_size=args.batch, max_seq_len=args.seq_len, seed=args.seed, cache_dir=args.cache_dir,
        overwrite=args.overwrite, progress=progress, stage=stage, adapter=args.adapter)
    kept = manifest["kept_layers"]
    print(f"emulator: {len(kept)} of {manifest['num_layers_full']} layers, kept {kept} "
          f"(adapter {manifest['adapter_layers']}, drop ratio {manifest['drop_ratio']})")
    print(f"alignment loss (L2 + KL on {manifest['records']['eval']} held-aside records): "
          f"{manifest['alignment_loss_before']:.4f} -> {manifest['alignment_loss_after']:.4f}")
    print(f"wrote {args.out} (emulator hash {manifest['emulator_hash'][:16]}..., "
          f"base model {manifest['base_model_hash'][:16]}...)")
    if manifest.get("aligned_to_adapter"):
        print(f"aligned to the adapter in {manifest['aligned_to_adapter']['path']}: to move the federation to it, "
              f"set emulator_hash = \"{manifest['emulator_hash']}\" in [modes.fedbiot] and [modes.fedbiot_zo] and restart the coordinator "
              f"(the ledger carries on); clients holding the old emulator are refused until they fetch this one")
    return 0


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(read_manifest(args.directory), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``edgefed-emulator``; returns the exit status (0 ok, 2 bad input, 1 I/O error)."""
    # transformers' tqdm bars (loading and writing weights) would interleave with the
    # progress lines and break the one-line error contract on stderr; this command prints
    # its own progress. Restored on return, since tests call main in-process.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "build":
            return _build(args)
        return _show(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except (_Usage, EmulatorError, ModelLoadError, DataError, ValueError) as error:
        print(f"{PROG}: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
