"""Peak resident memory of this process, as every report and log of qpissa states it."""

from __future__ import annotations

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
