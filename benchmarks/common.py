"""What every benchmark script shares: a timed child process and the results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results.json"


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data; the benchmark stops with why when the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} is absent: this benchmark needs ../shared/data beside the checkout")
    return path


def timed(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a child process (peak RSS from GNU time)."""
    tic = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    seconds = time.perf_counter() - tic
    if out.returncode != 0:
        raise SystemExit(f"{args[:4]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    peak = int(out.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0]) / 1024
    return seconds, peak, out.stdout


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{os.cpu_count()} CPU cores ({cpu})"


def store(section: str, results: dict) -> None:
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stored[section] = {"machine": machine(), **results}
    RESULTS.write_text(json.dumps(stored, indent=2) + "\n")
