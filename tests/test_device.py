"""Device detection and the memory budget (edge_client/device.py)."""

from __future__ import annotations

import psutil
import pytest
import torch

from edge_client.device import DEFAULT_HEADROOM, detect_device, parse_bytes, parse_headroom

GIB = 1024**3


def test_cpu_budget_is_the_available_host_ram_less_the_headroom():
    report = detect_device("cpu")
    host = psutil.virtual_memory()
    assert report.kind == "cpu" and report.device == "cpu"
    assert report.budget_source == "available host RAM" and report.user_budget_bytes is None
    # available RAM moves a little between the two reads
    assert abs(report.budget_bytes - host.available) < 0.05 * host.total
    assert report.headroom == DEFAULT_HEADROOM
    assert report.usable_bytes == int(report.budget_bytes * (1 - DEFAULT_HEADROOM))
    profile = report.profile()
    assert profile.device_type == "cpu" and profile.accelerator_total_bytes == 0
    assert profile.memory_budget_bytes is None


def test_a_user_budget_wins_and_is_reported():
    report = detect_device("cpu", memory_budget_bytes=6 * GIB, headroom=0.25)
    assert report.budget_bytes == 6 * GIB and report.budget_source == "set by the user"
    assert report.usable_bytes == int(4.5 * GIB)
    assert report.profile().memory_budget_bytes == 6 * GIB
    text = report.describe()
    assert "budget: 6.00 GiB (set by the user), headroom 25%, usable 4.50 GiB" in text


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device"),
    ("cuda:x", "unknown device"),
])
def test_unknown_devices_are_refused(device, message):
    with pytest.raises(ValueError, match=message):
        detect_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        detect_device("cuda")


@pytest.mark.parametrize("kwargs, message", [
    ({"memory_budget_bytes": 0}, "budget"),
    ({"headroom": 0.95}, "headroom"),
    ({"headroom": -0.1}, "headroom"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        detect_device("cpu", **kwargs)


@pytest.mark.parametrize("text, value", [("0.1", 0.1), ("10%", 0.1), ("25%", 0.25), ("0", 0.0)])
def test_parse_headroom(text, value):
    assert parse_headroom(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["lots", "95%", "-0.1", "1"])
def test_parse_headroom_refuses(text):
    with pytest.raises(ValueError, match="headroom"):
        parse_headroom(text)


@pytest.mark.parametrize("text, value", [("6GiB", 6 * GIB), ("512 MB", 512_000_000), ("1.5g", 1_500_000_000),
                                         ("1073741824", GIB)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "0", "6 parsecs"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        parse_bytes(text)
