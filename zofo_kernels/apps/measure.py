"""What zofo-train, zofo-bench and the Trainer measure: forward passes and peak memory.

:class:`CountedLoss` wraps a loss function and counts and times its calls (the forward
passes of a step); the memory helpers read this process's resident set size (CPU) or the
CUDA allocator's peak (GPU). One definition of each, used everywhere.
"""

from __future__ import annotations

import resource
import time
from typing import Callable, Optional

import torch


class CountedLoss:
    """A loss function that counts its calls and adds up their wall time.

    ``sync``: a device whose queued work is waited for before and after each call, so the
    time is the call's own on a GPU (CPU: nothing to wait for). ``calls`` and ``seconds`` are
    plain attributes: a resumed run sets ``calls`` back to its saved count."""

    def __init__(self, fn: Callable, sync: Optional[torch.device] = None):
        self.fn = fn
        self.sync = sync if sync is not None and torch.device(sync).type == "cuda" else None
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        if self.sync is not None:
            torch.cuda.synchronize(self.sync)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.sync is not None:
            torch.cuda.synchronize(self.sync)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _proc_status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set size now."""
    value = _proc_status_bytes("VmRSS")
    if value is None:
        raise OSError("the resident set size needs /proc/self/status (Linux)")
    return value


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started or since the last
    :func:`reset_peak_rss` (Linux: VmHWM; elsewhere the getrusage peak, which cannot be
    reset)."""
    value = _proc_status_bytes("VmHWM")
    if value is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return value


def reset_peak_rss() -> None:
    """Start a new peak: VmHWM drops to the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of this process on ``device``: the CUDA allocator's peak on a GPU,
    the peak resident set size on the CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def peak_memory_kind(device: torch.device) -> str:
    return ("cuda max_memory_allocated" if torch.device(device).type == "cuda"
            else "peak RSS")
