"""First-order clients on the seed wire, measured: python bench/first_order.py [--rounds N]

On the default model (SmolLM2-135M, LoRA r=8 on q_proj/v_proj, d = 460,800) and the
shipped data, the README's split (3 clients x 200 records, 64 held-out), this CPU:

1. **Projection.** A real local update Δ (one ferret round: 4 SGD steps at the default
   local rate) is sent as K scalars and rebuilt exactly as the federation does
   (projected_scalars -> the coordinator's aggregation -> the ordered perturbations):
   the relative error ‖Δ̂ − Δ‖/‖Δ‖ for several K, median of 3 seed sets, against
   PROTOCOL.md §8.1's √((d−1)/K). Then the time of one projection pass and of one
   perturbation pass over the same space (compiled kernels, medians of 7): at the LoRA
   size and at SmolLM2-135M's full size.
2. **Learning.** The same rounds, split and seeds for (a) a zeroth-order federation
   (every client MeZO), (b) a projected first-order federation (every client ferret),
   (b') the same with its values sent as (seed, float64) pairs rather than q8 (what
   packing costs in learning), (d) the mixed federation the chooser makes of budgets
   0.75/4/8 GiB (edgefed-local's defaults): each a live ``edgefed-local`` run; and (c) uncompressed first-order FedAvg
   of the same local steps in this process (each client trains from the global model
   in turn, the mean of their Δ is applied): the upper bound. Held-out loss every round,
   Rouge-L and exact match before and after.
   ``fo_time_vs_fedavg`` divides the ferret federation's training time (its first task
   to its last commit, from the coordinator's ledger) by FedAvg's (the clients' local
   training and the averaging, evaluation excluded): both run three clients' work on the
   same 2 cores, the federation as three processes at once, FedAvg one client after
   another.
3. **Memory.** The peak resident memory above the loaded model of a first-order step
   (LoRA, batch 4 x 96 tokens) with half the decoder layers skipped
   (edge_client/layer_dropout.py) against none, each in a fresh child process.

Prints the tables, saves everything to ``bench/results/first_order.json`` and prints, as
its last line, one JSON object with ``projection_rel_error`` (K = 1024, the default),
``projection_vs_perturb``, ``fo_bytes_per_client_round``, ``fo_gain_vs_fedavg``,
``fo_time_vs_fedavg``, ``dropout50_peak_vs_full``, ``mixed_fingerprints_agree``,
``zo_eval_loss_after``, ``fo_eval_loss_after`` and the rest of the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._results import write_result  # noqa: E402

SEED_SETS = 3
K_VALUES = (64, 256, 1024, 4096)
DEFAULT_K = 1024
TIMING_REPEATS = 7


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--skip-federations", action="store_true", help="projection and memory only (quick check)")
    parser.add_argument("--child-dropout", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- shared setup -------------------------------------------------------------------------


def local_federation_defaults() -> argparse.Namespace:
    from edge_client.local_federation import build_parser

    return build_parser().parse_args([])


def client_records() -> tuple[list[list[dict]], list[dict]]:
    """The README's split, as edgefed-local makes it."""
    from edge_client.local_federation import SHIPPED_DATA
    from edge_client.splits import split_records

    defaults = local_federation_defaults()
    records = [json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    split = split_records(records, clients=defaults.clients, heldout=defaults.heldout,
                          per_client=defaults.records_per_client, scheme="iid", seed=0)
    return split.clients, split.heldout


def load_lora(engine_cls: Any) -> tuple[Any, Any, Any, str]:
    from edge_client.data import resolve_prompt_format
    from edge_client.model import load_model, resolve_model
    from edge_client.scope import ScopeConfig

    model, tokenizer = load_model(resolve_model("smollm2-135m"))
    prompt_format = resolve_prompt_format("auto", tokenizer)
    model, space = engine_cls.prepare(model, ScopeConfig(kind="lora"))
    return model, space, tokenizer, prompt_format


def batch_stream(records: list[dict], tokenizer: Any, prompt_format: str, client_id: str) -> Any:
    """The batches the daemon would draw for ``client_id`` (same seed, same order)."""
    from edge_client.data import BatchStream, Record, tokenize

    defaults = local_federation_defaults()
    examples = tokenize([Record(r["instruction"], r["response"], i + 1) for i, r in enumerate(records)], tokenizer,
                        max_seq_len=defaults.max_seq_len, prompt_format=prompt_format)
    return BatchStream(examples, defaults.batch_size, seed=zlib.crc32(client_id.encode()),
                       pad_token_id=tokenizer.pad_token_id or 0)


# -- 1. projection ------------------------------------------------------------------------


def projection_errors() -> dict[str, Any]:
    from coordinator.aggregate import aggregate
    from edge_client.engines import RoundPlan
    from edge_client.engines.ferret import FerretEngine, FerretSettings, projected_scalars
    from protocol.messages import Update

    defaults = local_federation_defaults()
    clients, _ = client_records()
    model, space, tokenizer, prompt_format = load_lora(FerretEngine)
    engine = FerretEngine(model, space, FerretSettings(local_steps=defaults.ferret_steps))
    start = space.flat.detach().clone()
    engine.train_round(RoundPlan(1, tuple(range(1, DEFAULT_K + 1)), defaults.learning_rate, defaults.epsilon,
                                 defaults.batch_size), batch_stream(clients[0], tokenizer, prompt_format, "client-0"))
    delta = space.flat.detach() - start
    d = space.numel
    real = delta[:d].double()
    norm = float(real.norm())
    rows = []
    for k in K_VALUES:
        errors = []
        for repeat in range(SEED_SETS):
            seeds = tuple(1_000_003 * (repeat + 1) + 7919 * i for i in range(k))
            scalars = projected_scalars(delta, seeds, defaults.learning_rate)
            update = Update(round=1, attempt=0, client_id="c", pairs=tuple(zip(seeds, scalars)), num_examples=16,
                            loss_before=0.0, loss_after=0.0, nonce=bytes(16), signature=None)
            rebuilt = torch.zeros_like(delta)
            from edge_client.space import ParameterSpace

            target = ParameterSpace(rebuilt, [], "rademacher")
            for seed, coefficient in aggregate(seeds, [update], defaults.learning_rate, "mean"):
                target.apply(seed, coefficient)
            errors.append(float((rebuilt[:d].double() - real).norm()) / norm)
        rows.append({"k": k, "rel_error_median": statistics.median(errors), "rel_error_min": min(errors),
                     "rel_error_max": max(errors), "theory": math.sqrt((d - 1) / k)})
    return {"d": d, "delta_norm": norm, "rows": rows}


def _median_time(fn: Any) -> tuple[float, float, float]:
    times = []
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times)


def projection_timing() -> dict[str, Any]:
    from protocol.perturb import apply_rademacher, padded_length, project_rademacher

    sizes = {"lora": 460_800, "full": 134_515_008}
    out: dict[str, Any] = {}
    for name, n in sizes.items():
        flat = torch.randn(padded_length(n)) * 1e-3
        flat[n:] = 0
        for backend in ("compiled", "eager"):
            apply_rademacher(flat, 1, 1e-6, backend=backend)  # compile / warm up
            project_rademacher(flat, [1], backend=backend)
            perturb = _median_time(lambda: apply_rademacher(flat, 2, 1e-6, backend=backend))
            project = _median_time(lambda: project_rademacher(flat, [2], backend=backend))
            out[f"{name}_{backend}"] = {"perturb_s": perturb, "project_s": project,
                                        "project_vs_perturb": project[0] / perturb[0]}
        del flat
    return out


# -- 3. memory ----------------------------------------------------------------------------


def dropout_child(ratio: float) -> None:
    """In a fresh process: the peak RSS above the loaded model of one LoRA first-order
    step with every other decoder layer skipped (ratio 0.5) or none (0)."""
    from edge_client.engines.ferret import FerretEngine
    from edge_client.layer_dropout import skip_layers
    from profiles.procmem import hwm_reset, release_free_memory, status_kib

    torch.set_num_threads(2)
    clients, _ = client_records()
    model, space, tokenizer, prompt_format = load_lora(FerretEngine)
    batch = batch_stream(clients[0], tokenizer, prompt_format, "client-0").next_batch()
    layers = model.config.num_hidden_layers
    skipped = [layer for layer in range(layers) if ratio and layer % round(1 / ratio) == 1]
    release_free_memory()
    base = status_kib("VmRSS")
    hwm_reset()
    with skip_layers(model, skipped):
        output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                       use_cache=False)
        output.loss.backward()
    peak = status_kib("VmHWM")
    print(json.dumps({"ratio": ratio, "skipped": len(skipped), "layers": layers, "peak_above_model_kib": peak - base,
                      "base_kib": base}))


def dropout_memory() -> dict[str, Any]:
    results = {}
    for ratio in (0.0, 0.5):
        runs = []
        for _ in range(3):
            done = subprocess.run([sys.executable, __file__, "--child-dropout", str(ratio)], capture_output=True,
                                  text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                raise SystemExit(f"memory child failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        results[str(ratio)] = {"peaks_mib": [r["peak_above_model_kib"] / 1024 for r in runs],
                               "median_mib": statistics.median(r["peak_above_model_kib"] / 1024 for r in runs),
                               "skipped": runs[0]["skipped"], "layers": runs[0]["layers"]}
    results["ratio"] = results["0.5"]["median_mib"] / results["0.0"]["median_mib"]
    return results


# -- 2. learning --------------------------------------------------------------------------


def federation(label: str, extra: list[str], rounds: int) -> dict[str, Any]:
    """One live edgefed-local run; its summary, per-round rows and training time."""
    from edge_client.local_federation import main as edgefed_local

    with tempfile.TemporaryDirectory(prefix=f"edgefed-fo-{label}-") as tmp:
        run_dir = Path(tmp) / "run"
        print(f"\n=== federation ({label}): edgefed-local --rounds {rounds} {' '.join(extra)}", flush=True)
        code = edgefed_local(["--rounds", str(rounds), *extra, "--run-dir", str(run_dir)])
        if code != 0:
            raise SystemExit(f"edgefed-local ({label}) failed with exit code {code}")
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        status = json.loads((run_dir / "status.json").read_text())
    committed = [entry["committed_at"] for entry in status["rounds"]]
    first_task = status.get("first_task_at")
    training_s = (max(committed) - first_task) if committed and first_task else None
    return {"summary": summary, "rows": rows, "training_s": training_s, "status": status}


def fedavg(rounds: int) -> dict[str, Any]:
    """Uncompressed FedAvg of the same local steps, in this process."""
    from edge_client.engines import RoundPlan
    from edge_client.engines.ferret import FerretEngine, FerretSettings
    from edge_client.evaluate import EvalRecord, evaluate

    defaults = local_federation_defaults()
    clients, heldout = client_records()
    model, space, tokenizer, prompt_format = load_lora(FerretEngine)
    engine = FerretEngine(model, space, FerretSettings(local_steps=defaults.ferret_steps))
    streams = [batch_stream(records, tokenizer, prompt_format, f"client-{i}") for i, records in enumerate(clients)]
    held = [EvalRecord(r["instruction"], r["response"], r.get("family", "all")) for r in heldout]

    def measure(generate: bool) -> dict[str, Any]:
        result = evaluate(model, tokenizer, held, max_seq_len=defaults.max_seq_len, generate=generate,
                          prompt_format=prompt_format)
        return {"eval_loss": result.loss, "rouge_l": result.rouge_l if generate else None,
                "exact_match": result.exact_match if generate else None}

    print("\n=== FedAvg of the uncompressed updates (in-process)", flush=True)
    rows = [{"round": 0, **measure(True)}]
    print(f"  round 0: eval loss {rows[0]['eval_loss']:.4f}", flush=True)
    training = 0.0
    seeds = tuple(range(1, defaults.ferret_seeds + 1))  # the local rate is eta * K / T, as in the federation
    for round_number in range(1, rounds + 1):
        started = time.perf_counter()
        global_values = space.flat.detach().clone()
        total = torch.zeros_like(global_values)
        for stream in streams:
            space.flat.copy_(global_values)
            engine.train_round(RoundPlan(round_number, seeds[:1], defaults.learning_rate * defaults.ferret_seeds,
                                         defaults.epsilon, defaults.batch_size), stream)
            total += space.flat.detach() - global_values
        space.flat.copy_(global_values + total / len(streams))
        training += time.perf_counter() - started
        row = {"round": round_number, **measure(round_number == rounds)}
        rows.append(row)
        print(f"  round {round_number}: eval loss {row['eval_loss']:.4f} ({training:.0f}s training)", flush=True)
    bytes_per_client_round = space.numel * 4  # the float32 update each client would send
    return {"rows": rows, "training_s": training, "bytes_per_client_round": bytes_per_client_round}


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child_dropout is not None:
        dropout_child(args.child_dropout)
        return
    torch.set_num_threads(2)
    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}

    print("=== projection of a real ferret update (LoRA r=8 q/v, SmolLM2-135M)", flush=True)
    errors = projection_errors()
    details["projection_errors"] = errors
    print(f"d = {errors['d']}, |delta| = {errors['delta_norm']:.4f}")
    print(f"{'K':>6}  {'rel. error (median of 3)':>24}  {'min':>7}  {'max':>7}  {'sqrt((d-1)/K)':>13}")
    for row in errors["rows"]:
        print(f"{row['k']:>6}  {row['rel_error_median']:>24.3f}  {row['rel_error_min']:>7.3f}  "
              f"{row['rel_error_max']:>7.3f}  {row['theory']:>13.3f}")
    figures["projection_rel_error"] = next(r["rel_error_median"] for r in errors["rows"] if r["k"] == DEFAULT_K)
    figures["projection_rel_error_theory"] = math.sqrt((errors["d"] - 1) / DEFAULT_K)

    print("\n=== one projection pass vs one perturbation pass (median of 7 [min, max], seconds)", flush=True)
    timing = projection_timing()
    details["projection_timing"] = timing
    for name, row in timing.items():
        print(f"{name:<14} perturb {row['perturb_s'][0]:.4f} [{row['perturb_s'][1]:.4f}, {row['perturb_s'][2]:.4f}]"
              f"  project {row['project_s'][0]:.4f} [{row['project_s'][1]:.4f}, {row['project_s'][2]:.4f}]"
              f"  ratio {row['project_vs_perturb']:.2f}")
    figures["projection_vs_perturb"] = timing["full_compiled"]["project_vs_perturb"]
    figures["projection_vs_perturb_lora"] = timing["lora_compiled"]["project_vs_perturb"]

    print("\n=== peak of a first-order step, half the layers skipped vs none (MiB above the model)", flush=True)
    memory = dropout_memory()
    details["dropout_memory"] = memory
    for ratio in ("0.0", "0.5"):
        row = memory[ratio]
        print(f"ratio {ratio}: {row['skipped']}/{row['layers']} layers skipped, peaks "
              f"{', '.join(f'{p:.0f}' for p in row['peaks_mib'])} -> median {row['median_mib']:.0f} MiB")
    figures["dropout50_peak_vs_full"] = memory["ratio"]

    if not args.skip_federations:
        runs = {
            # Forced modes on budgets every client can run them in (0.75 GiB holds MeZO only).
            "zo": federation("zo", ["--mode", "mezo", "--budgets", "4GiB,4GiB,8GiB"], args.rounds),
            "fo": federation("fo", ["--mode", "ferret", "--budgets", "4GiB,4GiB,8GiB"], args.rounds),
            # The same, its values sent as (seed, float64) pairs instead of q8: what packing costs.
            "fo_pairs": federation("fo_pairs", ["--mode", "ferret", "--budgets", "4GiB,4GiB,8GiB",
                                                "--value-encoding", "pairs"], args.rounds),
            "mixed": federation("mixed", [], args.rounds),
        }
        avg = fedavg(args.rounds)
        details.update(federations=runs, fedavg=avg)
        base = avg["rows"][0]["eval_loss"]
        print("\n=== held-out eval loss per round")
        print(f"{'round':>5}  " + "  ".join(f"{name:>8}" for name in ("zo", "fo", "fo_pairs", "mixed", "fedavg")))
        for r in range(args.rounds + 1):
            cells = []
            for name in ("zo", "fo", "fo_pairs", "mixed"):
                rows = [row for row in runs[name]["rows"] if row["round"] == r]
                value = rows[0]["eval_loss"] if rows else (runs[name]["summary"]["eval_loss_before"] if r == 0 else None)
                cells.append("-" if value is None else f"{value:.4f}")
            cells.append(f"{avg['rows'][r]['eval_loss']:.4f}")
            print(f"{r:>5}  " + "  ".join(f"{c:>8}" for c in cells))
        print(f"\n{'run':<8} {'wall s':>7} {'train s':>8} {'B/client/round up':>18} {'Rouge-L':>15} {'exact':>13}")
        for name in ("zo", "fo", "fo_pairs", "mixed"):
            s = runs[name]["summary"]
            print(f"{name:<8} {s['wall_s']:>7.0f} {runs[name]['training_s'] or float('nan'):>8.0f} "
                  f"{s['bytes_per_client_round'] or 0:>18.0f} {s['rouge_l_before']:.3f}->{s['rouge_l_after']:.3f} "
                  f"{s['exact_match_before']:.3f}->{s['exact_match_after']:.3f}  modes {s.get('modes')}")
        last = avg["rows"][-1]
        print(f"{'fedavg':<8} {'':>7} {avg['training_s']:>8.0f} {avg['bytes_per_client_round']:>18} "
              f"{avg['rows'][0]['rouge_l']:.3f}->{last['rouge_l']:.3f} "
              f"{avg['rows'][0]['exact_match']:.3f}->{last['exact_match']:.3f}")
        fo, zo, mixed = runs["fo"]["summary"], runs["zo"]["summary"], runs["mixed"]["summary"]
        fo_pairs = runs["fo_pairs"]["summary"]
        fedavg_gain = base - last["eval_loss"]
        figures.update(
            zo_eval_loss_after=zo["eval_loss_after"], fo_eval_loss_after=fo["eval_loss_after"],
            mixed_eval_loss_after=mixed["eval_loss_after"], fedavg_eval_loss_after=last["eval_loss"],
            eval_loss_before=base,
            fo_gain_vs_fedavg=(fo["eval_loss_before"] - fo["eval_loss_after"]) / fedavg_gain,
            zo_gain_vs_fedavg=(zo["eval_loss_before"] - zo["eval_loss_after"]) / fedavg_gain,
            mixed_gain_vs_fedavg=(mixed["eval_loss_before"] - mixed["eval_loss_after"]) / fedavg_gain,
            fo_time_vs_fedavg=(runs["fo"]["training_s"] / avg["training_s"]) if runs["fo"]["training_s"] else None,
            fo_wall_s=fo["wall_s"], fo_training_s=runs["fo"]["training_s"], fedavg_training_s=avg["training_s"],
            fo_bytes_per_client_round=fo["bytes_per_client_round"],
            fo_wire_bytes_per_client_round=fo["wire_bytes_per_client_round"],
            fedavg_bytes_per_client_round=avg["bytes_per_client_round"],
            fo_bytes_vs_fedavg=fo["bytes_per_client_round"] / avg["bytes_per_client_round"],
            # q8 against pairs, same split and seeds: the gain kept and the bytes saved.
            fo_pairs_eval_loss_after=fo_pairs["eval_loss_after"],
            fo_pairs_bytes_per_client_round=fo_pairs["bytes_per_client_round"],
            fo_q8_gain_vs_pairs=(fo["eval_loss_before"] - fo["eval_loss_after"])
            / (fo_pairs["eval_loss_before"] - fo_pairs["eval_loss_after"]),
            fo_pairs_rouge_l=[fo_pairs["rouge_l_before"], fo_pairs["rouge_l_after"]],
            mixed_fingerprints_agree=mixed["fingerprints_agree"], mixed_modes=mixed.get("modes"),
            fo_rouge_l=[fo["rouge_l_before"], fo["rouge_l_after"]],
            fo_exact_match=[fo["exact_match_before"], fo["exact_match_after"]],
            mixed_rouge_l=[mixed["rouge_l_before"], mixed["rouge_l_after"]],
            zo_rouge_l=[zo["rouge_l_before"], zo["rouge_l_after"]],
            fedavg_rouge_l=[avg["rows"][0]["rouge_l"], last["rouge_l"]],
            rounds=args.rounds,
        )
    path = write_result("first_order", figures, details)
    print(f"\nfull result: {path.relative_to(ROOT)}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
