"""Stage bookkeeping: wall time and peak memory of each stage of a run (the output folder and JSON helpers are in
``files.py``)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import torch

from .interrupts import raise_pending


def maxrss_bytes(ru_maxrss: int) -> int:
    """getrusage's ru_maxrss in bytes: it is bytes on macOS, KiB on Linux and the BSDs."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # another C library: RSS then includes what was freed before
        return None


def _release_free_memory() -> None:
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # glibc: return freed heap pages to the system


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc serves blocks above a threshold with their own mmap (returned to the system when freed) but raises
    that threshold up to 32 MB each time such a block is freed, after which freed tensors stay in the heap and
    count as resident: the tokenizer pass alone made FLAT-LLM's peak on SmolLM2 180 MB higher. A fixed threshold
    (which also turns that adjustment off) keeps every tensor above ``nbytes`` returnable."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


class PeakMemory:
    """Samples this process's resident memory in a thread; the peak since start (plus CUDA peak if any)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        _release_free_memory()  # what earlier stages freed but the allocator kept is not this stage's peak
        self.peak = _rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


class StageLog:
    """Collects {stage: {seconds, peak_rss_mb, [peak_cuda_mb], ...details}} for the report."""

    def __init__(self):
        self.stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        entry: dict = {}
        t0 = time.time()
        raise_pending()  # a Ctrl-C some library swallowed stops the run here at the latest
        with PeakMemory() as mem:
            start = mem.peak  # after freed memory went back to the system: what the stage starts from
            yield entry
        raise_pending()
        entry.update(seconds=round(time.time() - t0, 2), peak_rss_mb=round(mem.peak / 2**20, 1),
                     start_rss_mb=round(start / 2**20, 1))
        if torch.cuda.is_available():
            entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.stages[name] = entry
