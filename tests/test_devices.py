"""The device planning table (profiles/devices.py, edgefed-profiles)."""

from __future__ import annotations

import json

from profiles.chooser import POLICY, TrainingTask, policy_entry
from profiles.devices import DEVICES, MODELS, main, plan_table

MEZO = policy_entry("mezo")

GIB = 1024**3
TASK = TrainingTask(scope="full", batch_size=8, max_seq_len=256)


def test_every_device_and_model_gets_a_cell():
    rows = plan_table(TASK, [MEZO], built={"mezo"})
    assert [row["device"] for row in rows] == [d.name for d in DEVICES]
    for row in rows:
        assert set(row["models"]) == set(MODELS)
        for cell in row["models"].values():
            assert cell["mode"] in (None, "mezo")
            if cell["mode"] is None:
                assert cell["needs_bytes"] > row["budget_bytes"] * 0.9


def test_more_memory_never_runs_less():
    rows = sorted(plan_table(TASK, [MEZO], built={"mezo"}), key=lambda row: row["budget_bytes"])
    for model in MODELS:
        batches = [row["models"][model]["batch"] for row in rows]
        assert batches == sorted(batches), model
    # a full-parameter 7B model in float32 needs more than any of these devices has
    assert all(row["models"]["Llama-2-7B"]["mode"] is None for row in rows)
    assert all(row["models"]["SmolLM2-135M"]["batch"] == 8 for row in rows)


def test_the_command_prints_a_table_marked_estimated_and_writes_json(tmp_path, capsys):
    out = tmp_path / "devices.json"
    assert main(["--json", str(out), "--batch", "4", "--seq-len", "128"], built=[MEZO]) == 0
    text = capsys.readouterr().out
    assert "ESTIMATED" in text and "GPU 24 GiB" in text and "Llama-3.2-1B" in text
    payload = json.loads(out.read_text())
    assert payload["estimated"] is True and payload["task"]["batch"] == 4
    assert len(payload["rows"]) == len(DEVICES)


def test_bad_arguments_are_one_line(capsys):
    assert main(["--batch", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_all_modes_lists_the_policy_in_order_marking_the_planned_ones(capsys):
    assert main(["--modes", "all"], built=[MEZO]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ", ".join(e.mode + ("" if e.mode == "mezo" else "*") for e in POLICY) in lines[0]
    cells = " ".join(lines[3:])
    assert "ferret* b" in cells  # a roomy GPU would run ferret, which has no engine here
    assert "mezo b" in cells and "mezo* b" not in cells


def test_the_installed_command_marks_cells_from_the_engine_registry(capsys, tmp_path):
    from edge_client.engines import available_engines
    from edge_client.profiles_cli import main as installed_main

    out = tmp_path / "devices.json"
    assert installed_main(["--modes", "all", "--json", str(out)]) == 0
    modes = json.loads(out.read_text())["modes"]
    assert {mode for mode, state in modes.items() if state == "built"} == set(available_engines())
    assert set(modes) >= {e.mode for e in POLICY}
