"""This process's memory, for logs and benchmarks: its peak and current resident set.

Peak is VmHWM from /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss across
fork + exec, so a child (a prepare worker, a benchmark row) would report its parent's peak.
"""

from __future__ import annotations

import resource


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space, MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current RSS, MiB (the peak where /proc is missing)."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()
