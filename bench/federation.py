"""A short real federation, measured: python bench/federation.py [edgefed-local options]

Runs ``edgefed-local`` (default model SmolLM2-135M, shipped data, 3 clients) in a fresh
run directory, then prints a table and, as its last line, one JSON object with
``eval_loss_before``, ``eval_loss_after``, ``bytes_per_client_round`` (everything a
client sends in one round: its update and its fingerprint, websocket framing included,
TCP/IP headers not) and ``wall_s``, plus the other figures of the run's summary.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_client.local_federation import main as edgefed_local  # noqa: E402


def run(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        code = edgefed_local([*argv, "--run-dir", str(run_dir)])
        if code != 0:
            raise SystemExit(f"edgefed-local failed with exit code {code}")
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["metrics"] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary


def main() -> None:
    summary = run(sys.argv[1:])
    print()
    print("figure                        value")
    for key in ("rounds", "wall_s", "bytes_per_client_round", "eval_loss_before", "eval_loss_after",
                "rouge_l_before", "rouge_l_after", "exact_match_before", "exact_match_after", "heldout_examples"):
        value = summary.get(key)
        print(f"{key:<29} {value if not isinstance(value, float) else round(value, 4)}")
    figures = {key: value for key, value in summary.items() if key != "metrics"}
    figures["eval_loss_by_round"] = [m["eval_loss"] for m in summary["metrics"]]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
