"""What the benchmarks share: one measurement per fresh Python process, and its memory read from the kernel.

A child's getrusage ru_maxrss starts from its parent's peak (measured here: a 9 MB child reported the 220 MB of
the driver that forked it), so peaks are read from /proc/self/status VmHWM, the process's own high-water mark
since exec, which can also be restarted (reset_peak_rss); ru_maxrss only where /proc is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

from ropelite.errors import RopeliteError


def _status_mb(field: str) -> float | None:
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def rss_mb() -> float:
    """Resident memory now (VmRSS), MB; NaN without /proc."""
    now = _status_mb("VmRSS")
    return float("nan") if now is None else now


def reset_peak_rss() -> bool:
    """Restart the RSS high-water mark (Linux >= 4.0), so that setting up (e.g. a random init, which peaks
    above a forward) does not hide the measured part's own peak. False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM, or getrusage's ru_maxrss where /proc is missing."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def run_worker(argv: list[str], what: str, env: dict | None = None) -> dict:
    """Run ``python argv...`` (a benchmark calling itself for one measurement) and return the JSON object it
    prints last; a failure is a RopeliteError naming ``what`` and the worker's last line of stderr."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RopeliteError(f"{what} failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None
