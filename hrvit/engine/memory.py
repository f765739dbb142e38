"""Peak memory of a stretch of work in this process: the GPU allocator's peak on a GPU, the
process's resident-set high-water mark (VmHWM) on CPU, where there is no allocator to ask.

    mem = PeakMemory()
    mem.reset()          # before the work: returns what is held now (bytes)
    ...                  # the work
    mem.peak()           # highest use since reset (bytes)

On CPU the high-water mark is reset through /proc/self/clear_refs (Linux); freed heap is
returned to the OS first (malloc_trim) so memory released before the work does not count.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch


def proc_status(key: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class PeakMemory:
    """Reset and read the peak memory of this process on its device ("cuda" or "cpu")."""

    def __init__(self, gpu: bool | None = None):
        self.gpu = torch.cuda.is_available() if gpu is None else gpu

    def reset(self) -> int:
        """Start a new peak; returns the bytes held now."""
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        held = proc_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return held

    def peak(self) -> int:
        """Highest bytes in use since the last reset."""
        if self.gpu:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return proc_status("VmHWM")
