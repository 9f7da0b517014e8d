"""Stage bookkeeping: wall time and peak memory of each stage of a run, and the output folder that only
appears, complete, when the run finished."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from .interrupts import raise_pending
from .errors import InputError, UserError


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


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
        pin_mmap_threshold()

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


def unfinished(folder: Path) -> Path | None:
    """The ``.partial`` folder (a run that did not finish) ``folder`` is or lies in, if any."""
    return next((p for p in (folder, *folder.parents) if p.name.endswith(".partial")), None)


def finished_folder(folder: str | Path, expected: str) -> Path:
    """``folder`` as a Path when it exists and is not (inside) an unfinished run's ``.partial`` folder; otherwise a
    message naming ``expected`` (what the command wants to be given)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give {expected}")
    partial = unfinished(folder.resolve())
    if partial is not None:
        raise InputError(f"{partial} is the unfinished output of a run that did not complete (killed, failed, or "
                         "still running): its files may be cut short; run the recipe again")
    return folder


def read_json(path: Path, error: type[Exception], fix: str, want_object: bool = True):
    """A JSON file's content, or ``error`` naming the file, what is wrong and ``fix``; ``want_object``: it must
    be a JSON object (a dict)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {fix}") from None
    if want_object and not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not {type(value).__name__}; {fix}")
    return value


class OutputError(UserError, OSError):
    """The output folder cannot be made, or another run is writing it."""


@contextlib.contextmanager
def write_errors(target: Path):
    """A failed write (disk full, file too large) that safetensors reports as its own error, as an OSError naming
    ``target``; other libraries already raise OSError."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        if "I/O error" not in str(exc):
            raise
        raise OutputError(f"could not write {target}: {exc}; free disk space or choose another --output") from None


class OutputDir:
    """Builds into ``<dir>.partial`` and renames it to ``<dir>`` only on success, so a killed run never leaves a
    folder that looks complete. A run that fails with an error removes ``<dir>.partial`` unless ``keep_failed``
    (then the error names it). Refuses an existing ``<dir>`` unless ``overwrite``.

    A ``<dir>.partial`` left by a killed run (SIGKILL, power loss) is stale: the next run with the same ``<dir>``
    removes it (and says so). A run holds an advisory lock (``flock``) on ``<dir>.partial/.lock`` while it works,
    which the kernel releases when the process dies, so a partial folder that another live run is still writing is
    refused instead of deleted. ``--overwrite`` swaps folders by renames: an old ``<dir>`` is renamed to
    ``<dir>.old`` before the new one takes its name, so no moment leaves a half-deleted ``<dir>``."""

    LOCK = ".lock"

    def __init__(self, final: str | Path, overwrite: bool = False, keep_failed: bool = False,
                 marker: str | None = None):
        self.final = Path(os.path.abspath(os.path.expanduser(final)))  # "." and "x/.." have no name of their own
        self.work = self.final.with_name(self.final.name + ".partial")
        self.overwrite, self.keep_failed, self.marker = overwrite, keep_failed, marker
        self._lock = None

    def check(self) -> None:
        if not self.final.exists():
            return
        if not self.overwrite:
            raise FileExistsError(f"output directory {self.final} exists; choose another --output or pass "
                                  "--overwrite to replace it")
        if self.marker and not (self.final / self.marker).is_file():  # a model folder, the repo, a home folder ...
            raise FileExistsError(f"--overwrite replaces only an earlier output of this command, and {self.final} is "
                                  f"not one (it has no {self.marker}): remove it yourself or choose another --output")

    def _take_lock(self, folder: Path):
        """An exclusive lock on folder/.lock, or None when another live process holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, a stale folder is removed as before
            return open(folder / self.LOCK, "a")
        handle = open(folder / self.LOCK, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
        return handle

    def __enter__(self) -> Path:
        self.check()
        if self.work.exists():
            held = self._take_lock(self.work) if self.work.is_dir() else None
            if held is None and self.work.is_dir():
                raise OutputError(f"{self.work} is being written by another run that is still working; wait for it "
                                  "or choose another --output")
            if held is not None:
                held.close()
            if self.work.is_dir():
                shutil.rmtree(self.work)
            else:
                self.work.unlink()
            print(f"note: removed {self.work}, left by an earlier run that did not finish", file=sys.stderr)
        try:
            self.work.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {self.work}: {exc.strerror or exc}; choose an "
                              "--output in a folder you can write to") from None
        self._lock = self._take_lock(self.work)
        return self.work

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        (self.work / self.LOCK).unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if self.keep_failed:
                self._unlock()
                note = f"the unfinished output is kept in {self.work} for inspection"
            else:
                shutil.rmtree(self.work, ignore_errors=True)
                self._unlock()
                note = f"nothing was written to {self.final} (pass --keep-failed to keep the unfinished output)"
            if isinstance(exc, Exception) and exc.args and isinstance(exc.args[0], str):
                exc.args = (f"{exc.args[0]}\n{note}",) + exc.args[1:]
            return False  # the final name never appears
        self._unlock()
        old = self.final.with_name(self.final.name + ".old")
        if self.final.exists():
            if old.exists():
                shutil.rmtree(old)  # left by an --overwrite run killed between its two renames
            os.replace(self.final, old)
        os.replace(self.work, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return False
