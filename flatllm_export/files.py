"""Files of a run: the output folder that only appears, complete, when the run finished (``OutputDir``), JSON read
with errors that name the file and the fix, and failed writes named with their target. A leaf module: every layer
may use it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from .errors import InputError, UserError


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
