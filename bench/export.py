"""Taking the README federation's model home: python bench/export.py [--run-dir DIR] [--repeats 3]

Runs the README's local federation (``edgefed-local`` with its defaults: SmolLM2-135M,
3 clients, LoRA, 8 rounds, its evaluator on 64 held-out records), or reuses a finished
run's directory, then exports its final round from the ledger file ``--repeats`` times
(HF directory, peft adapter, GGUF float32; then once more as GGUF float16), timing each
export whole: ledger replay, fingerprint check and writing.

The exports are loaded back the ways a user loads them (``AutoModelForCausalLM`` from
the HF directory; transformers' GGUF loader from the GGUF) and scored with the
evaluator's own function on the run's held-out records, at the federation's sequence
length and prompt format, to compare with the loss the evaluator reported for that round.

Writes bench/results/export.json; the last line printed is one JSON object with
``export_s`` (median), ``export_s_spread`` (min, max), ``hf_eval_loss``,
``gguf_eval_loss`` (float32), ``gguf_f16_eval_loss``, ``evaluator_eval_loss`` and
``fingerprint_match``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_result  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="a finished edgefed-local run to export (default: run the README federation)")
    parser.add_argument("--repeats", type=int, default=3, help="timed exports (median and spread reported)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="the run's --max-seq-len, which its evaluator used (default: edgefed-local's)")
    return parser.parse_args(argv)


def run_federation(run_dir: Path) -> None:
    from edge_client.local_federation import main as edgefed_local

    print(f"=== the README federation: edgefed-local --run-dir {run_dir} --no-export", flush=True)
    if edgefed_local(["--run-dir", str(run_dir), "--no-export"]) != 0:
        raise SystemExit("edgefed-local failed")


def heldout_loss(model: Any, tokenizer: Any, records: list[Any], max_seq_len: int, prompt_format: str) -> float:
    from edge_client.evaluate import evaluate

    return evaluate(model, tokenizer, records, max_seq_len=max_seq_len, batch_size=8, generate=False,
                    prompt_format=prompt_format).loss  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_seq_len is None:
        from edge_client.local_federation import build_parser

        args.max_seq_len = build_parser().parse_args([]).max_seq_len
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_client.data import resolve_prompt_format
    from edge_client.evaluate import load_eval_records
    from exporter.export import export_model

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="edgefed-export-bench-") as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        if args.run_dir is None:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            run_federation(run_dir)
        metrics = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
        status = json.loads((run_dir / "status.json").read_text())
        final_round = status["round"]
        evaluator_loss = next(m["eval_loss"] for m in metrics if m["round"] == final_round)
        heldout = load_eval_records(run_dir / "heldout.jsonl")
        max_seq_len = args.max_seq_len

        out_root = Path(tmp) / "exports"
        out_root.mkdir()
        timings, results = [], []
        for repeat in range(args.repeats):
            out = out_root / f"export-{repeat}"
            started = time.perf_counter()
            result = export_model(run_dir / "ledger.db", out, model_source="smollm2-135m", gguf_dtype="f32")
            timings.append(time.perf_counter() - started)
            results.append(result)
            print(f"export {repeat + 1}/{args.repeats}: {timings[-1]:.1f}s, round {result.round}, "
                  f"fingerprint match {result.fingerprint_match}", flush=True)
            if repeat:
                shutil.rmtree(out)  # keep one; the disk is shared
        f16_started = time.perf_counter()
        f16 = export_model(run_dir / "ledger.db", out_root / "export-f16", model_source="smollm2-135m",
                           formats=["gguf"], gguf_dtype="f16")
        f16_s = time.perf_counter() - f16_started
        exported = out_root / "export-0"

        tokenizer = AutoTokenizer.from_pretrained(exported / "hf")
        prompt_format = resolve_prompt_format("auto", tokenizer)
        hf = AutoModelForCausalLM.from_pretrained(exported / "hf", dtype=torch.float32)
        hf_loss = heldout_loss(hf, tokenizer, heldout, max_seq_len, prompt_format)
        del hf
        gguf32 = AutoModelForCausalLM.from_pretrained(exported, gguf_file="model-f32.gguf", dtype=torch.float32)
        gguf_loss = heldout_loss(gguf32, tokenizer, heldout, max_seq_len, prompt_format)
        del gguf32
        gguf16 = AutoModelForCausalLM.from_pretrained(out_root / "export-f16", gguf_file="model-f16.gguf",
                                                      dtype=torch.float32)
        gguf16_loss = heldout_loss(gguf16, tokenizer, heldout, max_seq_len, prompt_format)
        sizes = {path.name: path.stat().st_size for path in [*exported.iterdir(), *(out_root / "export-f16").iterdir()]
                 if path.is_file()}

    figures = {
        "export_s": round(statistics.median(timings), 2),
        "export_s_spread": [round(min(timings), 2), round(max(timings), 2)],
        "hf_eval_loss": hf_loss,
        "gguf_eval_loss": gguf_loss,
        "gguf_f16_eval_loss": gguf16_loss,
        "evaluator_eval_loss": evaluator_loss,
        "fingerprint_match": all(r.fingerprint_match for r in results) and f16.fingerprint_match,
    }
    print()
    print(f"{'':<28}{'eval loss':>12}")
    print(f"{'evaluator (round ' + str(final_round) + ')':<28}{evaluator_loss:>12.6f}")
    print(f"{'HF export':<28}{hf_loss:>12.6f}")
    print(f"{'GGUF float32 export':<28}{gguf_loss:>12.6f}")
    print(f"{'GGUF float16 export':<28}{gguf16_loss:>12.6f}")
    print(f"export (hf + adapter + gguf f32): median {figures['export_s']}s over {args.repeats} "
          f"(min {figures['export_s_spread'][0]}s, max {figures['export_s_spread'][1]}s); gguf f16 alone {f16_s:.1f}s")
    path = write_result("export", figures, {
        "round": final_round, "timings_s": timings, "gguf_f16_export_s": f16_s, "heldout_records": len(heldout),
        "max_seq_len": max_seq_len, "prompt_format": prompt_format, "fingerprint": results[0].fingerprint,
        "fingerprint_reports": results[0].manifest["fingerprint_reports"], "file_bytes": sizes,
        "run_dir": str(args.run_dir) if args.run_dir else "temporary (edgefed-local defaults)"})
    print(f"wrote {path.relative_to(ROOT)}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
