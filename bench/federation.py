"""A short real federation, measured: python bench/federation.py [edgefed-local options]

Runs ``edgefed-local`` (default model SmolLM2-135M, shipped data, 3 clients) in a fresh
run directory, then prints a table and, as its last line, one JSON object with the
figures of the run's summary.json plus ``eval_loss_by_round``. The byte figures are
measured by the coordinator at its sockets: the bytes of the websocket frames each
client connection carried (permessage-deflate is off, so frame bytes are socket bytes;
handshake, pings and close frames included; TLS records and TCP/IP headers not), and a
round's bytes are those between the previous commit and its own:

* ``bytes_per_client_round``: uplink only (client -> coordinator: an update, the previous
  round's fingerprint, pongs), all rounds' uplink divided by the updates they committed;
* ``wire_bytes_per_client_round``: both directions (the downlink adds the task, the ack and
  the commit), the mean over the training clients of each one's mean per round it trained.

The full result (every round's row, the summary, the coordinator's final status) goes to
``bench/results/federation.json`` (bench/_results.py). For a quick check of the path, any
edgefed-local option shrinks the run, e.g. ``--rounds 1 --heldout 8 --loss-only``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_result  # noqa: E402
from edge_client.local_federation import main as edgefed_local  # noqa: E402

# The figures of the table, in order; all of them are in the final JSON line too.
TABLE_FIGURES = ("rounds", "wall_s", "bytes_per_client_round", "wire_bytes_per_client_round", "eval_loss_before",
                 "eval_loss_after", "rouge_l_before", "rouge_l_after", "exact_match_before", "exact_match_after",
                 "heldout_examples", "quorum", "rounds_not_robust", "fingerprints_agree", "fingerprints")


def run(argv: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Run edgefed-local; return its summary, its per-round rows and the final status."""
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        code = edgefed_local([*argv, "--run-dir", str(run_dir)])
        if code != 0:
            raise SystemExit(f"edgefed-local failed with exit code {code}")
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        status = json.loads((run_dir / "status.json").read_text())
    return summary, rows, status


def main() -> None:
    summary, rows, status = run(sys.argv[1:])
    print()
    print("figure                        value")
    for key in TABLE_FIGURES:
        value = summary.get(key)
        print(f"{key:<29} {value if not isinstance(value, float) else round(value, 4)}")
    figures = {**summary, "eval_loss_by_round": [row["eval_loss"] for row in rows]}
    path = write_result("federation", figures, {"rounds": rows, "summary": summary, "status": status})
    print(f"full result: {path.relative_to(ROOT)}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
