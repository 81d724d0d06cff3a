"""What the coordinator's live page costs and how fresh it is, in headless Chromium.

Runs a local federation as separate processes (``edgefed-coordinator`` and
``edgefed-client`` x N over 127.0.0.1; by default on a tiny random Llama, so rounds
commit about every second: the page's worst case, a push per change) and measures:

* ``page_load_ms``: from the browser's navigation start to the first snapshot drawn
  (``body.dataset.snapshots`` set), the median over ``--loads`` fresh loads;
* ``update_latency_ms``: from a round's commit (the ledger's ``committed_at``) to the
  page drawing that round (a MutationObserver on ``#round`` stamps ``Date.now()``; same
  machine, same clock), the median over the rounds committed while the page was open;
* ``page_bytes``: what one load transfers (the page, its script and stylesheet, as the
  browser's Resource Timing counts them), and ``snapshot_bytes``, one feed frame;
* ``coordinator_cpu_pct_with_page_open`` / ``_without``: the coordinator process's CPU
  time over wall time (psutil), in alternating windows with and without a page open,
  each the median over ``--windows`` windows (one page open: the browser runs beside it
  on the same 2 cores, as it would on a laptop hosting the coordinator);
* ``screenshot``: a PNG of the page mid-federation.

Run from the repository root: ``python bench/dashboard.py`` (about 4 minutes), or
``--quick``. Needs Chromium and its driver (``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402

from bench._browser import BrowserMissing, headless_chromium  # noqa: E402
from bench._results import RESULTS_DIR, write_result  # noqa: E402

BIN = Path(sys.executable).parent

# Stamps the wall clock at which the page first drew each round number.
ROUND_WATCH = """
window.__roundSeen = window.__roundSeen || {};
const target = document.getElementById('round');
const stamp = () => { const r = Number(target.textContent);  // "-" before the first snapshot
                      if (Number.isInteger(r) && !(r in window.__roundSeen)) window.__roundSeen[r] = Date.now(); };
new MutationObserver(stamp).observe(target, {childList: true, characterData: true, subtree: true});
stamp();
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def start_federation(work: Path, clients: int, model: str | None) -> tuple[list[subprocess.Popen[bytes]], int]:
    """A coordinator (unbounded rounds) and ``clients`` clients; returns them and the port."""
    model_is_tiny = model is None
    if model is None:
        from edge_client.tiny import make_tiny_llama

        model = str(make_tiny_llama(work / "tiny"))
    model_hash = subprocess.run([str(BIN / "edgefed-client"), "--print-model-hash", "--model", model],
                                capture_output=True, text=True, check=True).stdout.split()[-1]
    port = free_port()
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    coordinator = subprocess.Popen(
        [str(BIN / "edgefed-coordinator"), "--model-hash", model_hash, "--port", str(port), "--rounds", "0",
         "--model-name", "tiny-random-llama" if model_is_tiny else Path(model).name,
         "--ledger-path", str(work / "ledger.db"), "--min-clients", str(clients), "--clients-per-round",
         str(clients), "--quorum", str(clients), "--local-steps", "3", "--batch-size", "2", "--max-seq-len", "64",
         # 1e-4: the tiny random model stays stable for the thousand rounds the benchmark commits
         "--learning-rate", "1e-4", "--deadline-s", "120"],
        stdout=(logs / "coordinator.log").open("wb"), stderr=subprocess.STDOUT)
    processes = [coordinator]
    for index in range(clients):
        data = work / f"client-{index}.jsonl"
        with data.open("w") as out:
            for i in range(index * 20, index * 20 + 20):
                out.write(json.dumps({"instruction": f"What is {i % 17} plus {i % 13}?",
                                      "response": f"{i % 17 + i % 13}"}) + "\n")
        processes.append(subprocess.Popen(
            [str(BIN / "edgefed-client"), "--url", f"ws://127.0.0.1:{port}", "--client-id", f"client-{index}",
             "--data", str(data), "--model", model, "--device", "cpu", "--cache-dir", str(work / "cache")],
            stdout=(logs / f"client-{index}.log").open("wb"), stderr=subprocess.STDOUT))
    # An evaluator, as edgefed-local runs one: its held-out loss reaches the page through its fingerprints.
    heldout = work / "heldout.jsonl"
    with heldout.open("w") as out:
        for i in range(1000, 1016):
            out.write(json.dumps({"instruction": f"What is {i % 17} plus {i % 13}?",
                                  "response": f"{i % 17 + i % 13}"}) + "\n")
    processes.append(subprocess.Popen(
        [str(BIN / "edgefed-eval"), "--url", f"ws://127.0.0.1:{port}", "--client-id", "evaluator", "--model", model,
         "--heldout", str(heldout), "--loss-only", "--cache-dir", str(work / "cache")],
        stdout=(logs / "evaluator.log").open("wb"), stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if fetch_json(f"http://127.0.0.1:{port}/status")["round"] >= 1:
                return processes, port
        except OSError:
            pass
        if coordinator.poll() is not None:
            break
        time.sleep(0.5)
    raise SystemExit(f"the federation did not commit a round; logs in {logs}")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def cpu_window(process: psutil.Process, seconds: float) -> float:
    """The process's CPU use over the next ``seconds``, in percent of one core."""
    cpu0, wall0 = cpu_seconds(process), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(process) - cpu0) / (time.monotonic() - wall0)


def load_page(driver: Any, url: str) -> tuple[float, int]:
    """Load the page afresh; (ms from navigation start to the first snapshot drawn, bytes transferred)."""
    driver.get("about:blank")
    driver.get(url)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30, poll_frequency=0.005).until(
        lambda d: d.execute_script("return document.body.dataset.snapshots"))
    # The page marks its first drawn snapshot itself: no WebDriver round trip in the figure.
    drawn_at = driver.execute_script(
        "return performance.getEntriesByName('edgefed-first-snapshot')[0].startTime;")
    transferred = driver.execute_script("""
        const entries = [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')];
        return entries.reduce((sum, e) => sum + (e.transferSize || 0), 0);""")
    return float(drawn_at), int(transferred)


def tag_screenshot(png: Path, result: Path) -> None:
    """Record in the PNG's text chunks the commit it was taken at, as every result file
    does ({"commit": ..., "result": ...}; Pillow re-saves it losslessly)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    git = json.loads(result.read_text())["environment"]["git"]
    info = PngInfo()
    info.add_text("Software", "bench/dashboard.py")
    info.add_text("Comment", json.dumps({"commit": git["commit"], "dirty": git["dirty"], "result": result.name}))
    with Image.open(png) as image:
        image.load()
    image.save(png, pnginfo=info)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--model", default=None, help="a model for the clients (default: a tiny random Llama)")
    parser.add_argument("--loads", type=int, default=7, help="fresh page loads timed")
    parser.add_argument("--windows", type=int, default=4, help="CPU windows with and without the page, each")
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="3 loads, 2 windows of 8 s each")
    args = parser.parse_args(argv)
    if args.quick:
        args.loads, args.windows, args.window_s = 3, 2, 8.0
    try:
        driver = headless_chromium()
    except BrowserMissing as missing:
        print(f"bench/dashboard.py: {missing}", file=sys.stderr)
        return 2
    screenshot = RESULTS_DIR / "dashboard.png"
    with tempfile.TemporaryDirectory(prefix="edgefed-dashboard-") as tmp:
        work = Path(tmp)
        processes, port = start_federation(work, args.clients, args.model)
        coordinator = psutil.Process(processes[0].pid)
        page = f"http://127.0.0.1:{port}/"
        try:
            print(f"federation up on port {port}; timing {args.loads} page loads")
            loads = [load_page(driver, page) for _ in range(args.loads)]
            from websockets.sync.client import connect

            with connect(f"ws://127.0.0.1:{port}/live") as feed:
                snapshot_bytes = len(feed.recv(timeout=10).encode())  # one feed frame, as the page gets it
            with urllib.request.urlopen(page, timeout=10) as response:
                html_bytes = len(response.read())
            print("coordinator CPU in alternating windows: page closed, page open")
            without: list[float] = []
            with_page: list[float] = []
            latencies: list[float] = []
            for window in range(args.windows):
                driver.get("about:blank")
                without.append(cpu_window(coordinator, args.window_s))
                driver.get(page)
                driver.execute_script(ROUND_WATCH)
                with_page.append(cpu_window(coordinator, args.window_s))
                seen = driver.execute_script("return window.__roundSeen;") or {}
                status = fetch_json(f"{page}status")
                committed = {entry["round"]: entry["committed_at"] for entry in status["rounds"]}
                first = min((int(r) for r in seen), default=0)
                # The first round stamped may predate the watch; the later ones were seen arrive.
                latencies += [seen[r] - committed[int(r)] * 1000 for r in seen
                              if int(r) > first and int(r) in committed]
                print(f"  window {window + 1}/{args.windows}: {without[-1]:5.1f}% closed, {with_page[-1]:5.1f}% open, "
                      f"{len(seen)} rounds drawn")
            driver.save_screenshot(str(screenshot))
            rounds_done = fetch_json(f"{page}status")["round"]
        finally:
            driver.quit()
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    load_ms = [ms for ms, _ in loads]
    page_bytes = statistics.median(b for _, b in loads)
    figures = {
        "page_load_ms": spread(load_ms), "update_latency_ms": spread(latencies) if latencies else None,
        "coordinator_cpu_pct_with_page_open": spread(with_page), "coordinator_cpu_pct_without": spread(without),
        "page_bytes": page_bytes, "html_bytes": html_bytes, "snapshot_bytes": snapshot_bytes,
        "rounds_committed": rounds_done, "clients": args.clients, "model": args.model or "tiny random Llama",
        "window_s": args.window_s,
    }
    print()
    print(f"{'figure':38s} {'median':>10s} {'min':>10s} {'max':>10s} {'n':>4s}")
    for key in ("page_load_ms", "update_latency_ms", "coordinator_cpu_pct_without", "coordinator_cpu_pct_with_page_open"):
        value = figures[key]
        if value is not None:
            print(f"{key:38s} {value['median']:10.1f} {value['min']:10.1f} {value['max']:10.1f} {value['n']:4d}")
    print(f"{'page_bytes (one load, transferred)':38s} {page_bytes:10.0f}")
    print(f"{'snapshot_bytes (one feed frame)':38s} {snapshot_bytes:10d}")
    line = {
        "page_load_ms": figures["page_load_ms"]["median"],
        "update_latency_ms": None if not latencies else figures["update_latency_ms"]["median"],
        "page_bytes": page_bytes,
        "coordinator_cpu_pct_with_page_open": figures["coordinator_cpu_pct_with_page_open"]["median"],
        "coordinator_cpu_pct_without": figures["coordinator_cpu_pct_without"]["median"],
        "screenshot": str(screenshot.relative_to(REPO_ROOT)),
    }
    path = write_result("dashboard", line, figures)
    tag_screenshot(screenshot, path)
    print(f"full result: {path}; screenshot: {screenshot}")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
