"""edgefed-client's command line: bad input gets a one-line error, not a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_client.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_a_bad_record_is_refused_with_its_line_when_asked(tmp_path, tiny):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"}\n')
    result = run_client("--url", "ws://127.0.0.1:9", "--client-id", "c", "--data", str(data),
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
