"""FedBiOT's emulator on the real model: what it costs in memory, how well it aligns, and
how much of the full-model clients' progress its clients buy (issue #19).

    python bench/emulator.py            # about 15 minutes on this 2-core CPU (10 rounds)
    python bench/emulator.py --quick    # a few minutes: short alignment, 3 rounds

Stages, all on SmolLM2-135M-Instruct (the default model) on this machine:

1. **Build** an emulator with ``edgefed-emulator build``'s function (half the layers
   below the 2 adapter layers dropped, aligned by distillation on the shipped data's
   public records): the alignment loss before and after, on its held-aside records.
2. **Memory**, each in a fresh child process (weights inside the peak, the interpreter
   baseline outside it, as ``profiles/profiler.py`` measures): the fp32 full model's
   no-grad forward with the loss, and the training step (forward, loss, backward into
   the adapter) of a 4-bit and an 8-bit emulator client, as the fedbiot engine runs it
   (:meth:`FedBiOTEngine._loss_backward`, which is the same HF loss as the forward), the
   same batch for all; one MeZO step through the 4-bit emulator (fedbiot_zo) and one on
   the full fp32 model (mezo) on the same scope; the full model's fp32 ferret step
   beside them for scale. Each training step's estimate (profiles/estimator.py) is
   printed beside it.
3. **Quality**: two ``edgefed-local`` federations with the same data, rounds, scope
   (LoRA on the adapter layers) and learning rate: three emulator clients (mode fedbiot,
   4-bit) against three full-model clients (mode ferret). The held-out loss is the
   full model's with the federated adapter, measured by edgefed-local's evaluator
   replaying the ledger, so the emulator clients' adapter is scored where it is used.
   The emulator's own held-out loss (no adapter) is printed beside the full model's.
4. **The chooser picks it**: one mixed federation, ``--emulator`` given to every client
   and budgets 0.35, 0.5, 0.75 and 4 GiB: the chooser gives the smallest client the
   emulator's forward-only mode (fedbiot_zo), the next the emulator (fedbiot), then MeZO
   and ferret, all reporting one fingerprint.

The last line is one JSON object: ``emulator4bit_peak_vs_fp32_forward``,
``alignment_loss_before``, ``alignment_loss_after``, ``full_model_with_adapter_eval_gain``,
``emulator_vs_full_clients_gain_ratio`` and more. The full result goes to
``bench/results/emulator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_result  # noqa: E402

MODEL = "smollm2-135m"
SCOPE = {"lora_rank": 8, "lora_alpha": 16.0, "lora_targets": ("q_proj", "v_proj"), "lora_init_seed": 0}
FULL = {"steps": 200, "rounds": 10, "memory_batch": 4, "memory_seq_len": 256, "repeats": 3}
QUICK = {"steps": 20, "rounds": 3, "memory_batch": 4, "memory_seq_len": 128, "repeats": 1}
MEMORY_KINDS = ("fp32_forward", "nf4_step", "int8_step", "nf4_zo_step", "fp32_mezo_step", "fp32_ferret_step")
# The mixed federation: a budget for each of the four modes an emulator holder can get
# (edgefed-local's task: batch 4 x 96 tokens; the chooser's picks, from the memory model).
MIXED_BUDGETS = "0.35GiB,0.5GiB,0.75GiB,4GiB"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short alignment, 3 rounds, one memory repeat")
    parser.add_argument("--keep", type=Path, default=None, help="keep the emulator and the runs in this directory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.settings = dict(QUICK if args.quick else FULL)
    return args


# -- memory: one measurement per fresh child process ---------------------------------------


def measure_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak resident bytes of one operation above the interpreter baseline (run in a child)."""
    import torch

    from edge_client.data import Batch
    from edge_client.engines.fedbiot import FedBiOTEngine, FedBiOTSettings, load_client_emulator
    from edge_client.engines.fedbiot_zo import FedBiOTZOEngine, FedBiOTZOSettings
    from edge_client.engines.ferret import FerretEngine, FerretSettings
    from edge_client.engines.mezo import MeZOEngine, MeZOSettings
    from edge_client.model import load_model
    from edge_client.scope import ScopeConfig
    from profiles.procmem import hwm_reset, release_free_memory, status_kib

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    kind, rows, seq_len = spec["kind"], spec["batch"], spec["seq_len"]
    if kind == "bitsandbytes_import":  # what importing it costs a client, on its own
        release_free_memory()
        before_kib = status_kib("VmRSS")
        import bitsandbytes  # noqa: F401

        release_free_memory()
        return {"kind": kind, "resident_bytes": (status_kib("VmRSS") - before_kib) * 1024}
    # Libraries before the baseline, as profiles/profiler.py does (the estimator's
    # convention): every kind starts from the same process state, and bitsandbytes'
    # import is reported on its own (the kind above).
    import bitsandbytes  # noqa: F401

    release_free_memory()
    baseline_kib = status_kib("VmRSS")
    generator = torch.Generator().manual_seed(0)
    manifest = json.loads((Path(spec["emulator"]) / "emulator.json").read_text())
    scope = ScopeConfig(kind="lora", lora_layers=tuple(manifest["adapter_layers"]), **{
        k: tuple(v) if isinstance(v, list) else v for k, v in SCOPE.items()})
    if kind.startswith("fp32_"):
        model, tokenizer = load_model(spec["model_dir"])
    else:
        model, tokenizer, manifest = load_client_emulator(spec["emulator"], quantization=kind.split("_")[0])
    input_ids = torch.randint(0, tokenizer.vocab_size, (rows, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100  # the first half is prompt, as the profiler's batches
    batch = Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    if kind == "fp32_forward":
        def op() -> None:
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                      use_cache=False).loss.item()
    elif kind in ("nf4_zo_step", "fp32_mezo_step"):  # one MeZO step: two forwards, three passes
        zo_cls = FedBiOTZOEngine if kind == "nf4_zo_step" else MeZOEngine
        model, space = zo_cls.prepare(model, scope)
        zo = zo_cls(model, space, (FedBiOTZOSettings if kind == "nf4_zo_step" else MeZOSettings)())

        def op() -> None:
            zo.step(7, batch, 1e-6, 1e-3)
    else:
        engine_cls = FerretEngine if kind == "fp32_ferret_step" else FedBiOTEngine
        settings = (FerretSettings if kind == "fp32_ferret_step" else FedBiOTSettings)(micro_batch=rows)
        model, space = engine_cls.prepare(model, scope)
        engine = engine_cls(model, space, settings)

        def op() -> None:
            engine._loss_backward(batch)
            for parameter in engine.parameters:
                parameter.grad = None
    op()  # first use: kernels, thread pools, bitsandbytes' lazy state
    release_free_memory()
    resident_kib = status_kib("VmRSS")  # weights, libraries loaded since the baseline, warm state
    if not hwm_reset():
        raise SystemExit("needs Linux's resettable high-water mark (/proc/self/clear_refs)")
    started = time.perf_counter()
    op()
    op()
    seconds = (time.perf_counter() - started) / 2
    peak_kib = status_kib("VmHWM")
    return {"kind": kind, "peak_bytes": (peak_kib - baseline_kib) * 1024, "baseline_bytes": baseline_kib * 1024,
            "resident_before_op_bytes": (resident_kib - baseline_kib) * 1024, "op_s": seconds}


def measure(kind: str, model_dir: Path, emulator: Path, settings: dict[str, Any]) -> dict[str, Any]:
    spec = {"kind": kind, "model_dir": str(model_dir), "emulator": str(emulator), "batch": settings["memory_batch"],
            "seq_len": settings["memory_seq_len"]}
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"the {kind} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- federations --------------------------------------------------------------------------


def federation(name: str, work: Path, emulator: Path, rounds: int, *extra: str) -> dict[str, Any]:
    """One edgefed-local run (its own processes); its summary.json plus the wall time."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a --keep directory's earlier run: this one starts afresh
    command = [sys.executable, "-m", "edge_client.local_federation", "--emulator", str(emulator),
               "--rounds", str(rounds), "--loss-only", "--no-export", "--run-dir", str(run_dir), *extra]
    print(f"  {name}: {' '.join(command[3:])}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"the {name} federation failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["bench_wall_s"] = time.time() - started
    gain = summary["eval_loss_before"] - summary["eval_loss_after"]
    print(f"    eval loss {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f} (gain {gain:.4f}), "
          f"modes {summary['modes']}, fingerprints agree: {summary['fingerprints_agree']}, "
          f"{summary['bench_wall_s']:.0f} s", flush=True)
    return summary


def heldout_losses(emulator: Path, model_dir: Path, heldout: Path, ledger: Path) -> dict[str, float]:
    """Held-out loss of the full model and of the emulator (fp32), each without the
    adapter and with the last round's adapter of ``ledger`` (rebuilt from the ledger, as
    the exporter does; the emulator gets the same values through its layer map)."""
    import torch

    from edge_client.data import resolve_prompt_format
    from edge_client.engines.fedbiot import FedBiOTEngine, load_client_emulator
    from edge_client.evaluate import evaluate, load_eval_records
    from exporter.replay import rebuild

    records = load_eval_records(heldout)

    def loss(model: Any, tokenizer: Any) -> float:
        return evaluate(model, tokenizer, records, max_seq_len=96, generate=False,
                        prompt_format=resolve_prompt_format("auto", tokenizer)).loss

    rebuilt = rebuild(ledger, str(model_dir), verify=False)  # the last committed round
    trained = rebuilt.space.flat.detach().clone()
    losses = {"full_model_with_adapter": loss(rebuilt.model, rebuilt.tokenizer)}
    with torch.no_grad():
        rebuilt.space.flat.zero_()  # A = B = 0: the adapter adds B A x = 0, the base model
    losses["full_model"] = loss(rebuilt.model, rebuilt.tokenizer)
    model, tokenizer, _ = load_client_emulator(emulator, quantization=None)
    scope = rebuilt.facts.scope
    model, space = FedBiOTEngine.prepare(model, scope)
    if [e.name for e in space.entries] != [e.name for e in rebuilt.space.entries]:
        raise SystemExit("the emulator's adapter space is not the federation's")
    with torch.no_grad():
        space.flat.zero_()
    losses["emulator"] = loss(model, tokenizer)
    with torch.no_grad():
        space.flat.copy_(trained)
    losses["emulator_with_adapter"] = loss(model, tokenizer)
    return losses


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_child(json.loads(args.child))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edge_client.emulator import build_emulator, public_records
    from edge_client.model import resolve_model
    from profiles.estimator import ModelShape, estimate

    settings = args.settings
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgefed-emulator-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(resolve_model(MODEL))
    emulator = work / "emu"
    started = time.time()

    print(f"=== 1. building the emulator ({settings['steps']} alignment steps)", flush=True)
    if (emulator / "emulator.json").exists():  # --keep DIR of an earlier run: its build time is in the manifest
        manifest = json.loads((emulator / "emulator.json").read_text())
        print("  reusing", emulator, f"(built in {manifest['build_seconds']:.0f} s)")
    else:
        def progress(step: int, total: int, loss: float) -> None:
            if step == total or step % max(1, total // 10) == 0:
                print(f"    step {step}/{total}: alignment loss {loss:.4f}", flush=True)

        manifest = build_emulator(model_dir, emulator, records=public_records(), steps=settings["steps"],
                                  progress=progress)
    build_s = manifest["build_seconds"]
    alignment = {"before": manifest["alignment_loss_before"], "after": manifest["alignment_loss_after"]}
    print(f"  kept layers {manifest['kept_layers']} of {manifest['num_layers_full']}, adapter "
          f"{manifest['adapter_layers']}; alignment loss {alignment['before']:.4f} -> {alignment['after']:.4f} "
          f"({build_s:.0f} s)", flush=True)

    print(f"\n=== 2. peak memory (batch {settings['memory_batch']} x {settings['memory_seq_len']} tokens, "
          f"median of {settings['repeats']} fresh processes each)", flush=True)
    shape = ModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    memory: dict[str, Any] = {}
    imports = sorted(measure("bitsandbytes_import", model_dir, emulator, settings)["resident_bytes"]
                     for _ in range(settings["repeats"]))
    memory["bitsandbytes_import"] = {"median_resident_bytes": imports[len(imports) // 2],
                                     "spread_bytes": [imports[0], imports[-1]]}
    for kind in MEMORY_KINDS:
        runs = [measure(kind, model_dir, emulator, settings) for _ in range(settings["repeats"])]
        peaks = sorted(r["peak_bytes"] for r in runs)
        memory[kind] = {"runs": runs, "median_peak_bytes": peaks[len(peaks) // 2], "spread_bytes": [peaks[0], peaks[-1]],
                        "median_resident_bytes": sorted(r["resident_before_op_bytes"] for r in runs)[len(runs) // 2],
                        "median_op_s": sorted(r["op_s"] for r in runs)[len(runs) // 2]}
    keep_ratio = len(manifest["kept_layers"]) / manifest["num_layers_full"]
    estimates = {
        "nf4_step": estimate(shape, "emulator", scope="lora", batch=settings["memory_batch"],
                             seq_len=settings["memory_seq_len"], lora_rank=SCOPE["lora_rank"], keep_ratio=keep_ratio,
                             base_bits=4, adapter_layers=len(manifest["adapter_layers"]),
                             optimizer="sgd").total,
        "int8_step": estimate(shape, "emulator", scope="lora", batch=settings["memory_batch"],
                              seq_len=settings["memory_seq_len"], lora_rank=SCOPE["lora_rank"], keep_ratio=keep_ratio,
                              base_bits=8, adapter_layers=len(manifest["adapter_layers"]),
                              optimizer="sgd").total,
        "nf4_zo_step": estimate(shape, "emulator", scope="lora", batch=settings["memory_batch"],
                                seq_len=settings["memory_seq_len"], lora_rank=SCOPE["lora_rank"],
                                keep_ratio=keep_ratio, base_bits=4, adapter_layers=len(manifest["adapter_layers"]),
                                optimizer="zo").total,
    }
    forward = memory["fp32_forward"]["median_peak_bytes"]
    print(f"  {'what':<18} {'peak MiB':>9} {'spread MiB':>15} {'vs fp32 fwd':>11} {'estimate MiB':>12} {'s/op':>6}"
          f" {'resident MiB':>12}")
    for kind in MEMORY_KINDS:
        row = memory[kind]
        est = estimates.get(kind)
        print(f"  {kind:<18} {row['median_peak_bytes'] / 2**20:>9.0f} "
              f"{row['spread_bytes'][0] / 2**20:>7.0f}-{row['spread_bytes'][1] / 2**20:<7.0f} "
              f"{row['median_peak_bytes'] / forward:>11.2f} {'-' if est is None else f'{est / 2**20:.0f}':>12} "
              f"{row['median_op_s']:>6.2f} {row['median_resident_bytes'] / 2**20:>12.0f}")
    print("  (peak and resident: above the interpreter with torch, transformers, peft and bitsandbytes imported, as "
          "profiles/profiler.py measures; resident: before the measured step, after a warm-up one: weights and warm "
          f"state; importing bitsandbytes itself adds {memory['bitsandbytes_import']['median_resident_bytes'] / 2**20:.0f} "
          "MiB to a client)")

    print(f"\n=== 3. quality: {settings['rounds']} rounds, 3 clients, LoRA on layers {manifest['adapter_layers']}",
          flush=True)
    emulator_run = federation("emulator-clients", work, emulator, settings["rounds"], "--mode", "fedbiot",
                              "--emulator-quantization", "nf4", "--budgets", "4GiB")
    full_run = federation("full-model-clients", work, emulator, settings["rounds"], "--mode", "ferret",
                          "--budgets", "4GiB")
    heldout = next((work / "emulator-clients").rglob("heldout*.jsonl"))
    own = heldout_losses(emulator, model_dir, heldout, work / "emulator-clients" / "ledger.db")
    print(f"  held-out loss (the emulator clients' adapter): full model {own['full_model']:.4f} -> "
          f"{own['full_model_with_adapter']:.4f} with it; the emulator itself {own['emulator']:.4f} -> "
          f"{own['emulator_with_adapter']:.4f}")

    print(f"\n=== 4. the chooser: --emulator for every client, budgets {MIXED_BUDGETS}", flush=True)
    mixed = federation("mixed", work, emulator, settings["rounds"], "--clients", "4", "--budgets", MIXED_BUDGETS)

    emulator_gain = emulator_run["eval_loss_before"] - emulator_run["eval_loss_after"]
    full_gain = full_run["eval_loss_before"] - full_run["eval_loss_after"]
    result = {
        "emulator4bit_peak_vs_fp32_forward": round(memory["nf4_step"]["median_peak_bytes"] / forward, 3),
        "emulator8bit_peak_vs_fp32_forward": round(memory["int8_step"]["median_peak_bytes"] / forward, 3),
        "emulator4bit_zo_peak_vs_fp32_forward": round(memory["nf4_zo_step"]["median_peak_bytes"] / forward, 3),
        "emulator4bit_zo_peak_vs_fp32_mezo": round(memory["nf4_zo_step"]["median_peak_bytes"]
                                                   / memory["fp32_mezo_step"]["median_peak_bytes"], 3),
        "max_estimate_rel_error": round(max(abs(estimates[k] / memory[k]["median_peak_bytes"] - 1)
                                            for k in estimates), 3),
        "emulator4bit_resident_vs_fp32": round(memory["nf4_step"]["median_resident_bytes"]
                                               / memory["fp32_forward"]["median_resident_bytes"], 3),
        "bitsandbytes_import_mib": round(memory["bitsandbytes_import"]["median_resident_bytes"] / 2**20),
        "alignment_loss_before": round(alignment["before"], 4),
        "alignment_loss_after": round(alignment["after"], 4),
        "full_model_with_adapter_eval_gain": round(emulator_gain, 4),
        "full_clients_eval_gain": round(full_gain, 4),
        "emulator_vs_full_clients_gain_ratio": round(emulator_gain / full_gain, 3) if full_gain > 0 else None,
        "mixed_modes": sorted(mixed["modes"].values()),
        "mixed_fingerprints_agree": mixed["fingerprints_agree"],
    }
    details = {"settings": settings, "model": MODEL, "manifest": manifest, "build_s": build_s, "memory": memory,
               "estimates_bytes": estimates, "heldout_losses_emulator_clients_adapter": own,
               "federations": {"emulator_clients": emulator_run, "full_model_clients": full_run, "mixed": mixed},
               "bench_wall_s": time.time() - started}
    path = write_result("emulator-quick" if args.quick else "emulator", result, details)
    print(f"\nfull result: {path.relative_to(ROOT)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
