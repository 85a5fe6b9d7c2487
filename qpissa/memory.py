"""Memory facts: the peak resident memory every report and log states, and what the system can spare."""

from __future__ import annotations

import os
import resource
import sys


def peak_rss_mb() -> float:
    """This process's own peak resident set size, in MB.

    `ru_maxrss` alone is not that on Linux: a program started by fork and exec begins with its parent's
    high-water mark, so a conversion started from a large process would report the parent's peak.
    `VmHWM` counts the memory of this program only; elsewhere `ru_maxrss` is all there is.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, kB elsewhere


def available_memory_bytes() -> int:
    """Memory the system can still give this process without swapping (Linux `MemAvailable`).

    Elsewhere the free physical pages, or, where not even that is known, 64 GB (no limit in practice).
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 64 << 30
