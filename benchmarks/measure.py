"""What the benchmarks share: one measurement per fresh Python process, its memory read from the kernel, and
the peak of live tensor memory on CPU (the CPU analogue of CUDA's max_memory_allocated).

A child's getrusage ru_maxrss starts from its parent's peak (measured here: a 9 MB child reported the 220 MB of
the driver that forked it), so peaks are read from /proc/self/status VmHWM, the process's own high-water mark
since exec, which can also be restarted (reset_peak_rss); ru_maxrss only where /proc is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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


def held_bytes(*holders) -> int:
    """Bytes of the tensors that modules (parameters, gradients, buffers) and optimizers (their state) hold,
    each storage once (a tied weight is one); a sharded DTensor counts its local shard."""
    storages = {}
    for holder in holders:
        if isinstance(holder, torch.nn.Module):
            tensors = [*holder.parameters(), *(p.grad for p in holder.parameters()), *holder.buffers()]
        else:
            tensors = [v for state in holder.state.values() for v in state.values()]
        for t in tensors:
            for plain in _plain_tensors(t):
                storages[plain.untyped_storage().data_ptr()] = plain.untyped_storage().nbytes()
    storages.pop(0, None)  # empty storages
    return sum(storages.values())


def _plain_tensors(t) -> list:
    """The tensors with storage behind ``t``: itself, or the inner tensors of a wrapper subclass (a DTensor's
    local shard, torchao's 8-bit codes and scales)."""
    if not isinstance(t, torch.Tensor):
        return []
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in _plain_tensors(getattr(t, name))]


@contextlib.contextmanager
def _quiet_stderr():
    """fd 2 to /dev/null: some builds' profiler prints a line to it at each start and stop."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def live_tensor_peak(fn, *holders) -> dict:
    """Run ``fn()`` and return {"before": the bytes ``holders`` hold (held_bytes), "peak": that plus the largest
    sum of CPU allocations less frees while fn runs}. Every allocation and free of PyTorch's CPU allocator is
    recorded by its profiler (profile_memory), temporaries inside kernels and storage resizes (FSDP2 frees and
    re-allocates unsharded weights so) included; frees of memory allocated before are not. So ``fn`` must not
    free what was alive before it, beyond what it allocated itself (a training step after zero_grad(set_to_none)
    does not)."""
    from torch.profiler import ProfilerActivity, profile
    before = held_bytes(*holders)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    # kineto_results lists every event, allocations included, with their sizes (frees negative)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    if not events:
        raise RopeliteError("the profiler recorded no allocation: this torch does not report CPU memory events")
    return {"before": before, "peak": before + peak}
