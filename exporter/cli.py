"""``edgefed-export``: write the federation's model of a round as HF, peft adapter and GGUF.

Examples::

    edgefed-export runs/20261205-101500/ledger.db                 # last round, every format
    edgefed-export ledger.db --round 4 --out model-r4 --gguf-dtype f32
    edgefed-export ledger.db --formats adapter                    # just the LoRA adapter
    edgefed-export ws://coordinator:8765 --out model              # a running federation's latest round

The model is rebuilt from the ledger and must match the fingerprint the clients reported
for that round; otherwise nothing is written. Output appears whole or not at all.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from edge_client.model import DEFAULT_MODEL
from exporter.export import FORMATS, export_model
from exporter.gguf_file import GGUF_DTYPES
from exporter.online import is_coordinator_url
from exporter.replay import ExportError, read_ledger

__all__ = ["build_parser", "main", "how_to_load"]

_STAGES = {"replay": "replaying the ledger", "adapter": "writing the adapter", "hf": "writing the HF model",
           "gguf": "writing the GGUF"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefed-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ledger", help="the coordinator's ledger file (edgefed-local: <run dir>/ledger.db), or a "
                                       "running coordinator's ws:// or wss:// URL (its latest round)")
    parser.add_argument("--out", type=Path, default=None,
                        help="export directory to create (default: export-round-<N> beside the ledger)")
    parser.add_argument("--round", type=int, default=None, dest="round_number",
                        help="the round to export (default: the last committed)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the federation's base model (as given to its clients)")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated, from {', '.join(FORMATS)} (default: every one that applies)")
    parser.add_argument("--gguf-dtype", default="f16", choices=GGUF_DTYPES, help="tensor type of the GGUF's matrices")
    parser.add_argument("--force", action="store_true", help="replace an existing export directory")
    parser.add_argument("--no-verify", action="store_true",
                        help="export even when no client reported a fingerprint for the round")
    parser.add_argument("--cache-dir", default=None, help="model conversion cache (default: ~/.cache/edgefed)")
    parser.add_argument("--key", default=None, help="with a URL: a client key the coordinator's allow-list admits")
    parser.add_argument("--ca-file", default=None, help="with a wss:// URL: the federation's ca.pem")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


class _ProgressPrinter:
    """One line per stage on stderr, updated in place on a terminal, every 10% otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last: tuple[str, int] = ("", -1)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        percent = 100 if total == 0 else int(100 * done / total)
        step = percent if self.tty else percent // 10 * 10
        if (stage, step) == self.last:
            return
        self.last = (stage, step)
        line = f"  {_STAGES.get(stage, stage)}: {done}/{total} ({percent}%)"
        if self.tty:
            print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def how_to_load(directory: Path, files: dict[str, Path]) -> str:
    """The lines that tell a user how to load what was exported."""
    lines = []
    if "hf" in files:
        lines.append(f"  transformers: AutoModelForCausalLM.from_pretrained({str(files['hf'])!r})")
    if "adapter" in files:
        lines.append(f"  peft:         PeftModel.from_pretrained(base_model, {str(files['adapter'])!r})")
    if "gguf" in files:
        lines.append(f"  llama.cpp:    llama-cli -m {files['gguf']}")
        lines.append(f"  transformers: AutoModelForCausalLM.from_pretrained({str(directory)!r}, "
                     f"gguf_file={files['gguf'].name!r})")
    return "\n".join(lines)


def _terminate(signum: int, frame: object) -> NoReturn:
    # SIGTERM unwinds like Ctrl-C, so the partial output is removed on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="edgefed-export: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    # The exporter reports its own progress; transformers' loading bars would bury it.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    formats = None if args.formats is None else [part.strip() for part in args.formats.split(",") if part.strip()]
    try:
        out = args.out
        if out is None and is_coordinator_url(args.ledger):
            raise ExportError("with a coordinator URL, say where to write the export (--out)")
        if out is None:
            facts = read_ledger(args.ledger)
            out = Path(args.ledger).parent / \
                f"export-round-{facts.last_round if args.round_number is None else args.round_number}"
        started = time.perf_counter()
        result = export_model(args.ledger, out, model_source=args.model, round_number=args.round_number,
                              formats=formats, gguf_dtype=args.gguf_dtype, cache_dir=args.cache_dir,
                              replace=args.force, verify=not args.no_verify, progress=_ProgressPrinter(args.quiet),
                              key_path=args.key, ca_file=args.ca_file)
    except ExportError as error:
        print(f"edgefed-export: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgefed-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    agreeing = sum(1 for value in result.manifest["fingerprint_reports"].values() if value == result.fingerprint)
    reports = len(result.manifest["fingerprint_reports"])
    check = (f"fingerprint {result.fingerprint[:16]}... = {agreeing} of {reports} clients' report"
             if reports else "not checked (no client reported this round)")
    print(f"exported round {result.round} to {result.directory} in {time.perf_counter() - started:.1f}s; {check}")
    print(how_to_load(result.directory, result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
