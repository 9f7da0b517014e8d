"""Stage bookkeeping: wall time and peak memory of each stage of a run, and the output folder that only
appears, complete, when the run finished."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Samples this process's resident memory in a thread; the peak since start (plus CUDA peak if any)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
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
        with PeakMemory() as mem:
            yield entry
        entry.update(seconds=round(time.time() - t0, 2), peak_rss_mb=round(mem.peak / 2**20, 1))
        if torch.cuda.is_available():
            entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.stages[name] = entry


class OutputDir:
    """Builds into ``<dir>.partial`` and renames it to ``<dir>`` only on success, so a killed run never leaves a
    folder that looks complete. A run that fails with an error removes ``<dir>.partial`` unless ``keep_failed``
    (then the error names it). Refuses an existing ``<dir>`` unless ``overwrite``."""

    def __init__(self, final: str | Path, overwrite: bool = False, keep_failed: bool = False):
        self.final = Path(final)
        self.work = self.final.with_name(self.final.name + ".partial")
        self.overwrite, self.keep_failed = overwrite, keep_failed

    def check(self) -> None:
        if self.final.exists() and not self.overwrite:
            raise FileExistsError(f"output directory {self.final} exists; choose another --output or pass "
                                  "--overwrite to replace it")

    def __enter__(self) -> Path:
        self.check()
        if self.work.exists():
            shutil.rmtree(self.work)  # leftovers of a killed run
        self.work.mkdir(parents=True)
        return self.work

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if self.keep_failed:
                note = f"the unfinished output is kept in {self.work} for inspection"
            else:
                shutil.rmtree(self.work, ignore_errors=True)
                note = f"nothing was written to {self.final} (pass --keep-failed to keep the unfinished output)"
            if isinstance(exc, Exception) and exc.args and isinstance(exc.args[0], str):
                exc.args = (f"{exc.args[0]}\n{note}",) + exc.args[1:]
            return False  # the final name never appears
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.work, self.final)
        return False
