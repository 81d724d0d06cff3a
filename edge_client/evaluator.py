"""``edgefed-eval``: evaluate the federation's global model on held-out data.

The coordinator never evaluates (it has no model). An evaluator is an edge client in
observer mode: it connects like any client, follows the ledger round by round (so it
holds the same bits as every training client, and reports the same fingerprint), and
after each round scores the model on a held-out set that no client trains on:

* held-out loss (mean response-token cross-entropy), every round;
* Rouge-L and exact match from greedy decoding, at the first round it sees, every
  ``--generate-every`` rounds, and at the end of the federation.

Each evaluation is appended to a JSONL metrics file. Without ``--url`` it evaluates the
base model once and exits.

With ``--emulator DIR`` (a FedBiOT emulator of the model, ``edgefed-emulator build``) it
also scores the emulator, in float32, holding the same federated adapter (the scope's
values copied into the emulator's space through its layer map): ``emulator_eval_loss``
beside ``eval_loss`` in every entry. The full model with the adapter is what a
federation delivers; the emulator's number shows whether the emulator still tracks it
(when the full model improves and the emulator does not, re-align: README, FedBiOT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from edge_client.daemon import ClientConfig, EdgeClient, FatalClientError, client_threads
from edge_client.replica import federation_scope
from edge_client.data import DataError, resolve_prompt_format
from edge_client.evaluate import EvalResult, evaluate, load_eval_records
from edge_client.model import DEFAULT_MODEL, ModelLoadError, load_model, resolve_model
from protocol.messages import OBSERVER_MODE

__all__ = ["Evaluator", "EmulatorScorer", "main"]

logger = logging.getLogger(__name__)


class Evaluator:
    """Scores a model on held-out records and appends the results to a JSONL file.

    Args:
        records: the held-out records.
        metrics_path: JSONL file to append to (None: log only).
        max_seq_len: token limit of an example (the federation's).
        generate_every: decode and score Rouge-L/exact match every this many rounds
            (0: only at the first evaluation and at the end).
        max_new_tokens: greedy decoding length.
        batch_size: evaluation batch size.
        prompt_format: as the clients' ("auto", "plain" or "chat").
        loss_only: never decode (no Rouge-L / exact match): much faster.
    """

    def __init__(self, records: list[Any], metrics_path: Path | None, *, max_seq_len: int = 256,
                 generate_every: int = 0, max_new_tokens: int = 24, batch_size: int = 8,
                 prompt_format: str = "auto", loss_only: bool = False) -> None:
        if generate_every < 0:
            raise ValueError("generate_every must be >= 0")
        self.records = records
        self.metrics_path = metrics_path
        self.max_seq_len = max_seq_len
        self.generate_every = generate_every
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt_format = prompt_format
        self.loss_only = loss_only
        self.evaluated: dict[int, dict[str, Any]] = {}

    def score(self, model: Any, tokenizer: Any, round_number: int, *, generate: bool,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Evaluate now and record the result under ``round_number``."""
        result: EvalResult = evaluate(model, tokenizer, self.records, max_seq_len=self.max_seq_len,
                                      batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                                      generate=generate,
                                      prompt_format=resolve_prompt_format(self.prompt_format, tokenizer))
        entry = {
            "round": round_number,
            "eval_loss": result.loss,
            "rouge_l": result.rouge_l if generate else None,
            "exact_match": result.exact_match if generate else None,
            "examples": result.examples,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 2),
            "time": time.time(),
            "by_family": result.by_family if generate else None,
            **(extra or {}),
        }
        self.evaluated[round_number] = entry
        if self.metrics_path is not None:
            with self.metrics_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")
        if generate:
            logger.info("round %d: eval loss %.4f, Rouge-L %.4f, exact match %.3f (%d examples, %.0fs)",
                        round_number, result.loss, result.rouge_l, result.exact_match, result.examples,
                        result.seconds)
        else:
            logger.info("round %d: eval loss %.4f (%d examples, %.0fs)", round_number, result.loss,
                        result.examples, result.seconds)
        return entry

    def emulator_loss(self, scorer: EmulatorScorer, values: Any | None) -> float:
        """The held-out loss of ``scorer``'s emulator holding ``values`` (None: as loaded)."""
        model = scorer.holding(values)
        result = evaluate(model, scorer.tokenizer, self.records, max_seq_len=self.max_seq_len,
                          batch_size=self.batch_size, generate=False,
                          prompt_format=resolve_prompt_format(self.prompt_format, scorer.tokenizer))
        logger.info("emulator eval loss %.4f", result.loss)
        return result.loss

    def wants_generation(self, round_number: int) -> bool:
        if self.loss_only:
            return False
        first = not self.evaluated
        return first or (self.generate_every > 0 and round_number % self.generate_every == 0)


class EmulatorScorer:
    """A FedBiOT emulator, held in float32, that takes the federation's adapter values.

    Args:
        path: the emulator directory.
        expect_base_hash: the full model's base hash (it must be the emulator's base).

    Raises:
        ValueError: the emulator is refused (one line).
    """

    def __init__(self, path: str | Path, *, expect_base_hash: str) -> None:
        from edge_client.engines import EngineRefused
        from edge_client.engines.fedbiot import load_client_emulator

        try:
            self.model, self.tokenizer, self.manifest = load_client_emulator(path, quantization=None,
                                                                             expect_base_hash=expect_base_hash)
        except EngineRefused as error:
            raise ValueError(f"--emulator: {error}") from None
        self.space: Any = None

    def attach(self, scope: Any, distribution: str) -> None:
        """Build the federation's scope on the emulator (the space every emulator client trains)."""
        from edge_client.engines import EngineRefused
        from edge_client.engines.fedbiot_zo import FedBiOTZOEngine

        try:
            self.model, self.space = FedBiOTZOEngine.prepare(self.model, scope, distribution=distribution)  # type: ignore[arg-type]
        except EngineRefused as error:
            raise ValueError(f"--emulator: {error}") from None

    def holding(self, values: Any | None) -> Any:
        """The emulator with the adapter ``values`` loaded (None: unchanged)."""
        if values is not None:
            self.space.load(values)
        return self.model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefed-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="coordinator to follow; omit to evaluate the base model once")
    parser.add_argument("--client-id", default="evaluator")
    parser.add_argument("--heldout", required=True, type=Path, help="JSONL of held-out records")
    parser.add_argument("--metrics", type=Path, default=None, help="append results to this JSONL file")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N held-out records")
    parser.add_argument("--max-seq-len", type=int, default=256,
                        help="token limit when evaluating the base model without --url (else the federation's)")
    parser.add_argument("--generate-every", type=int, default=0,
                        help="decode every N rounds (0: first evaluation and the end only)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--loss-only", action="store_true", help="skip decoding (Rouge-L, exact match)")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "plain", "chat"],
                        help="must match the clients' (auto = the model's chat template if it has one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--emulator", default=None, metavar="DIR",
                        help="a FedBiOT emulator of the model: also score it with the federated adapter "
                             "(emulator_eval_loss)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {args.client_id} %(levelname)s %(message)s")
    client_threads()
    try:
        records = load_eval_records(args.heldout, limit=args.limit)
        evaluator = Evaluator(records, args.metrics, max_seq_len=args.max_seq_len,
                              generate_every=args.generate_every, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, prompt_format=args.prompt_format,
                              loss_only=args.loss_only)
        if args.url is None:
            model, tokenizer = load_model(resolve_model(args.model, cache_dir=Path(args.cache_dir) if args.cache_dir else None))
            extra = None
            if args.emulator is not None:
                from edge_client.model import base_weights_hash

                scorer = EmulatorScorer(args.emulator, expect_base_hash=base_weights_hash(model))
                extra = {"emulator_eval_loss": evaluator.emulator_loss(scorer, None)}
            entry = evaluator.score(model, tokenizer, 0, generate=not args.loss_only, extra=extra)
            print(json.dumps(entry))
            return 0
        client = EdgeClient(ClientConfig(url=args.url, client_id=args.client_id, data_path=None, model=args.model,
                                         mode=OBSERVER_MODE, cache_dir=args.cache_dir))
        client.prepare()
        emulator = None if args.emulator is None else EmulatorScorer(args.emulator,
                                                                      expect_base_hash=client.model_hash)

        def on_round(round_number: int) -> float:
            assert client.federation is not None and client.sync is not None
            evaluator.max_seq_len = client.federation.max_seq_len
            extra = None
            if emulator is not None:
                if emulator.space is None:
                    emulator.attach(federation_scope(client.federation), client.federation.perturbation)
                extra = {"emulator_eval_loss": evaluator.emulator_loss(emulator, client.sync.space.values())}
            entry = evaluator.score(client.model, client.tokenizer, round_number,
                                    generate=evaluator.wants_generation(round_number), extra=extra)
            return float(entry["eval_loss"])  # the daemon reports it to the coordinator's page

        client.on_round = on_round
        asyncio.run(client.run(handle_signals=True))
        final = client.sync.round if client.sync is not None else None
        if client.finished and final is not None:
            last = evaluator.evaluated.get(final)
            if not evaluator.loss_only and (last is None or last["rouge_l"] is None):
                evaluator.score(client.model, client.tokenizer, final, generate=True, extra={"final": True})
    except (ValueError, DataError, ModelLoadError, FatalClientError) as error:
        print(f"edgefed-eval: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
