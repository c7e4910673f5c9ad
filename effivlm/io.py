"""File helpers shared by every job: atomic writes, a job's log file and progress lines for it."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def write_text_atomic(path: Path, text: str | Iterable[str]) -> Path:
    """Write ``text`` (a string, or lines streamed one by one) beside ``path`` and rename it into place.

    A job killed mid-write leaves at most a hidden ``.name.*.tmp`` file, never a file that looks complete.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text) if isinstance(text, str) else fh.writelines(text)
        fh.flush()
        os.fsync(fh.fileno())
    return path


@contextmanager
def log_to_file(
    path: str | Path | None, what: str = "job", *, capture_output: bool = False
) -> Iterator[logging.Logger]:
    """Send effivlm's log records (INFO and up) to ``path`` while the block runs.

    The log records when the block started and when it finished (or failed, with the traceback) and how long
    it took. ``capture_output`` also sends ``sys.stdout`` and ``sys.stderr`` to the file (what libraries print).
    An error that ends the block is raised as usual; if nothing catches it and it ends the process (a workflow
    job), the process prints it as one line instead of a traceback (see :func:`_one_line_if_uncaught`).
    """
    package = logging.getLogger("effivlm")
    if path is None:
        yield package
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _LogFile(path, mode="a", encoding="utf-8")
    except OSError as err:  # a full or read-only results folder
        _one_line_if_uncaught(err, f"{what} cannot write its log", None)
        raise
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level = package.level
    package.addHandler(handler)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as streams:
            if capture_output:
                streams.enter_context(contextlib.redirect_stdout(handler.stream))
                streams.enter_context(contextlib.redirect_stderr(handler.stream))
            package.info("%s started (pid %d)", what, os.getpid())
            yield package
        package.info("%s finished in %.1f s", what, time.perf_counter() - started)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the log itself may be what cannot be written
            package.exception("%s failed after %.1f s", what, time.perf_counter() - started)
        _one_line_if_uncaught(err, f"{what} failed", path)
        raise
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        with contextlib.suppress(OSError):
            handler.close()


class _LogFile(logging.FileHandler):
    """A job's log file. A record that cannot be written (a full or read-only disk) fails the job with that
    error, where logging would print a traceback for every record and carry on."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise error
        super().handleError(record)


# The last error a job log recorded: (its id, its message, its one-line description, what failed, the log).
# Not the error itself, which would keep its traceback's frames alive.
_logged: tuple[int, str, str, str, Path | None] | None = None
_previous_hook = sys.excepthook


def _one_line_if_uncaught(error: BaseException, what: str, log: Path | None) -> None:
    """Should ``error`` end the process uncaught, print ``error: <what>: <Type>: <message> (traceback in
    <log>)`` on stderr instead of its traceback, which the log already holds: a Snakemake job that fails on bad
    input then says why in one line. Any other uncaught error is shown as before."""
    global _logged, _previous_hook
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
        return
    _logged = (id(error), str(error), describe_error(error), what, log)
    if sys.excepthook is not _excepthook:
        _previous_hook, sys.excepthook = sys.excepthook, _excepthook


def describe_error(error: BaseException) -> str:
    """``Type: message`` on one line; for an error raised ``from`` another (a library's retry wrapper around
    the real failure), the innermost cause too."""

    def one(err: BaseException) -> str:
        return f"{type(err).__name__}: {' '.join(str(err).split())}"

    cause = error.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    return one(error) if cause is None else f"{one(error)} (caused by {one(cause)})"


def _excepthook(kind: type[BaseException], value: BaseException, tb) -> None:
    if _logged is not None and _logged[:2] == (id(value), str(value)):
        *_, description, what, log = _logged
        where = "" if log is None else f" (traceback in {log})"
        # on a line of its own, even after a progress bar that left the cursor mid-line
        print(f"\nerror: {what}: {description}{where}", file=sys.stderr)
    else:
        _previous_hook(kind, value, tb)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes as hex, read in blocks (a checkpoint or data file need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write (and remove) a small file in it; raises OSError naming the folder
    when it is read-only or full. The workflow checks its results folder so before it starts any job."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise OSError(err.errno, f"results folder {folder} is not writable: {err.strerror}") from None


class Progress:
    """Progress of a job as log lines (``what: 40/300 samples (13%), 2.1 samples/s, eta 2m04s``).

    A tqdm bar redraws one line with carriage returns, which a log file shows as one endless line; these are
    plain lines, one when the work starts, then at most one per ``interval`` seconds, and one at the end.
    ``done`` counts work finished before this process started (a resumed evaluation): it is not in the rate.
    """

    def __init__(
        self,
        what: str,
        total: int,
        *,
        done: int = 0,
        unit: str = "samples",
        interval: float = 10.0,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.done, self.unit, self.interval = what, total, done, unit, interval
        self._initial = done
        self._say = say or logging.getLogger("effivlm.progress").info
        self._clock = clock
        self._started = self._last = clock()
        self._say(self._line())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if self.done >= self.total or now - self._last >= self.interval:
            self._last = now
            self._say(self._line())

    def _line(self) -> str:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        line = f"{self.what}: {self.done}/{self.total} {self.unit}{share}"
        elapsed = self._clock() - self._started
        new = self.done - self._initial
        if new <= 0 or elapsed <= 0:
            return line
        rate = new / elapsed
        if self.done >= self.total:
            return f"{line} in {_duration(elapsed)}, {rate:.2f} {self.unit}/s"
        return f"{line}, {rate:.2f} {self.unit}/s, eta {_duration((self.total - self.done) / rate)}"


def _duration(seconds: float) -> str:
    """``42s``, ``2m04s``, ``1h05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
