"""The device planning table (profiles/devices.py, edgefed-profiles)."""

from __future__ import annotations

import json

from profiles.chooser import POLICY, TrainingTask
from profiles.devices import DEVICES, MODELS, main, plan_table

GIB = 1024**3
TASK = TrainingTask(scope="full", batch_size=8, max_seq_len=256)


def test_every_device_and_model_gets_a_cell():
    rows = plan_table(TASK, {"mezo"})
    assert [row["device"] for row in rows] == [d.name for d in DEVICES]
    for row in rows:
        assert set(row["models"]) == set(MODELS)
        for cell in row["models"].values():
            assert cell["mode"] in (None, "mezo")
            if cell["mode"] is None:
                assert cell["needs_bytes"] > row["budget_bytes"] * 0.9


def test_more_memory_never_runs_less():
    rows = sorted(plan_table(TASK, {"mezo"}), key=lambda row: row["budget_bytes"])
    for model in MODELS:
        batches = [row["models"][model]["batch"] for row in rows]
        assert batches == sorted(batches), model
    # a full-parameter 7B model in float32 needs more than any of these devices has
    assert all(row["models"]["Llama-2-7B"]["mode"] is None for row in rows)
    assert all(row["models"]["SmolLM2-135M"]["batch"] == 8 for row in rows)


def test_the_command_prints_a_table_marked_estimated_and_writes_json(tmp_path, capsys):
    out = tmp_path / "devices.json"
    assert main(["--json", str(out), "--batch", "4", "--seq-len", "128"]) == 0
    text = capsys.readouterr().out
    assert "ESTIMATED" in text and "GPU 24 GiB" in text and "Llama-3.2-1B" in text
    payload = json.loads(out.read_text())
    assert payload["estimated"] is True and payload["task"]["batch"] == 4
    assert len(payload["rows"]) == len(DEVICES)


def test_bad_arguments_are_one_line(capsys):
    assert main(["--batch", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_all_modes_lists_the_policy_in_order(capsys):
    assert main(["--modes", "all"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert ", ".join(e.mode for e in POLICY) in first
