"""edgefed-client's command line: bad input gets a one-line error, not a traceback."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client import cli
from edge_client.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def run_client_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_client.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_client(*args: str) -> subprocess.CompletedProcess:
    """``edgefed-client ARGS`` in this process: the same ``main`` the entry point calls, without
    paying a fresh interpreter's torch import for each of these cases (the first test runs
    the real entry point). An escaping exception fails the test, as a traceback would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return subprocess.CompletedProcess(["edgefed-client", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_a_bad_record_is_refused_with_its_line_when_asked(tmp_path, tiny):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"}\n')
    result = run_client_process("--url", "ws://127.0.0.1:9", "--client-id", "c", "--data", str(data),
                                "--model", str(tiny), "--on-bad-record", "raise")
    assert result.returncode == 2
    assert f"{data}:2" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory-budget", "lots"], "not a memory size"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--mode", "telepathy"], "unknown mode"),
        (["--url", "http://x"], "ws://"),
    ],
)
def test_bad_arguments_give_one_clear_line(tmp_path, tiny, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    base = {"--url": "ws://127.0.0.1:9", "--client-id": "c", "--data": str(data), "--model": str(tiny)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = run_client(*[item for pair in base.items() for item in pair])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_plan_prints_the_device_budget_and_choice(tiny):
    result = run_client("--plan", "--model", str(tiny), "--device", "cpu", "--memory-budget", "3GiB",
                        "--memory-headroom", "20%", "--batch", "4", "--seq-len", "64")
    assert result.returncode == 0, result.stderr
    assert "budget: 3.00 GiB (set by the user), headroom 20%, usable 2.40 GiB" in result.stdout
    assert "plan: ferret (first-order, projected onto the round's seeds), batch 4/4 x 64 tokens" in result.stdout


def test_plan_refuses_a_budget_nothing_fits_with_the_one_that_would(tiny):
    result = run_client("--plan", "--model", str(tiny), "--device", "cpu", "--memory-budget", "1MiB")
    assert result.returncode == 2
    assert "no training mode fits" in result.stderr and "smallest budget that would work" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_forced_mode_that_does_not_fit_is_refused_before_training(tiny):
    result = run_client("--plan", "--model", str(tiny), "--device", "cpu", "--memory-budget", "1MiB",
                        "--mode", "mezo")
    assert result.returncode == 2
    assert "the forced mode mezo does not fit" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("headroom", ["95%", "-1", "lots"])
def test_a_bad_headroom_is_one_clear_line(tiny, headroom):
    result = run_client("--plan", "--model", str(tiny), "--memory-headroom", headroom)
    assert result.returncode == 2 and "headroom" in result.stderr and "Traceback" not in result.stderr



def test_plan_refuses_a_rebase_interval_below_one_in_one_line(tiny):
    result = run_client("--plan", "--model", str(tiny), "--device", "cpu", "--rebase-every", "0")
    assert result.returncode == 2
    assert "--rebase-every must be >= 1" in result.stderr and "Traceback" not in result.stderr
