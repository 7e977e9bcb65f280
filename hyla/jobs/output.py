"""What a job shows on the console and what only its log file keeps.

While a job runs, everything written to this process's stdout and stderr (hyla's own lines,
the lines Ray streams from its actors and workers, library logs, C-level output of child
processes started meanwhile) goes into the run's log file, and the console gets what a user
needs: the training workers' lines (step lines, hyla's warnings, their errors) and the
driver's own messages. Ray's internal actors (the Train controller, its watchers and
cleaners, raylets) and routine library chatter (timestamped INFO lines, deprecation
warnings from third-party code) stay in the log file, which the summary names.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

if TYPE_CHECKING:
    from hyla.platform.data import Progress

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "(RayTrainWorker pid=123)" or "(raylet, ip=...)" before a line Ray streamed from elsewhere
RAY_PREFIX = re.compile(r"^\((?P<source>[\w.:-]+)(?: pid=\d+)?(?:, ip=[\w.:]+)?\)\s?")
SHOWN_SOURCES = ("RayTrainWorker",)  # hyla's training and evaluation workers
# library chatter from the driver: timestamped INFO/DEBUG lines (Ray, MLflow), progress bars
# of artifact downloads, Ray's notice about its token auth on a loopback-only instance, and
# its notice (logged as an error) that Ray Data's prepare workers keep their constructor
# arguments in the object store, which they do for as long as the workers live
HIDDEN_DRIVER = re.compile(
    r"^(\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d\S*\s+(INFO|DEBUG)\b"
    r"|Downloading artifacts"
    r"|.*Token authentication is enabled for this Ray cluster"
    r"|\[[^]]*\] core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor "
    r"arguments in the object store)"
)
# `warnings` output from third-party code: "<site-packages path>:<line>: <Kind>Warning: ..."
LIBRARY_WARNING = re.compile(r"^\S*site-packages\S*:\d+: \w*Warning\b")


def shown(line: str, after_library_warning: bool) -> bool:
    """Whether a (complete, ANSI-stripped) line of output belongs on the console.
    `after_library_warning`: the previous line was a library's warning, whose next line,
    indented, quotes its source."""
    source, content = _split(line)
    if source is not None and source not in SHOWN_SOURCES:
        return False
    if after_library_warning and content.startswith(" "):
        return False
    return not (HIDDEN_DRIVER.match(content) or LIBRARY_WARNING.match(content))


def is_library_warning(line: str) -> bool:
    return bool(LIBRARY_WARNING.match(_split(line)[1]))


def _split(line: str) -> tuple[str | None, str]:
    """(the Ray process a streamed line came from, or None for this process's own; the
    line without that prefix)."""
    prefix = RAY_PREFIX.match(line)
    return (prefix.group("source"), line[prefix.end() :]) if prefix else (None, line)


@contextmanager
def routed_output(log_file: Path, keep: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Route this process's stdout and stderr (file descriptors 1 and 2, so also what child
    processes and C libraries write) through `shown` onto the console, and all of it into
    `log_file` (appended, with a header line per session). A new log file (and the folders
    made for it) is removed at the end unless `keep()`: a job that failed before its run
    existed leaves nothing behind. Where the log's folder cannot be made, nothing is routed."""
    created = [p for p in (log_file, *log_file.parents) if not p.exists()]
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # no log where the run's storage is unusable: the job's checks say why
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.dup(1)
    saved_err = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        with open(log_file, "ab") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n".encode())
            pump = threading.Thread(target=_pump, args=(read_end, console, log), daemon=True)
            pump.start()
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(console, 1)
                os.dup2(saved_err, 2)
                os.close(saved_err)
                # Processes started meanwhile may still hold the pipe; what they write later
                # is not waited for.
                pump.join(timeout=5.0)
                os.close(console)
    finally:
        if created and not keep():
            for path in created:  # the file, then the folders made for it, innermost first
                if path.is_dir():
                    with contextlib.suppress(OSError):  # not empty: something else is there
                        path.rmdir()
                else:
                    path.unlink(missing_ok=True)


def _pump(read_end: int, console: int, log: BinaryIO) -> None:
    """Copy lines from the pipe into the log file and the shown ones onto the console, until
    every writer has closed the pipe or the job's end closed the log and the console."""
    pending = b""
    after_warning = False
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        try:
            while chunk := pipe.read(65536):
                log.write(chunk)
                log.flush()
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for raw in lines:
                    text = ANSI.sub("", raw.decode("utf-8", errors="replace")).strip("\r")
                    if shown(text, after_warning):
                        os.write(console, raw + b"\n")
                    after_warning = is_library_warning(text)
            if pending:
                os.write(console, pending)
        except (OSError, ValueError):  # the job ended while a straggler still wrote
            return


class ProgressLines:
    """A `hyla.platform.data.prepare` progress callback for the console: on a terminal one
    line rewritten in place; in a log or a pipe (a job's driver output) a line at the start,
    at each further tenth of the source and at the end."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream = label, stream or sys.stderr
        self.tenths_shown = -1

    def __call__(self, progress: Progress) -> None:
        finished = progress.shards_done == progress.shards
        text = f"hyla: {self.label}: {progress.line()}"
        if self.stream.isatty():
            self.stream.write(f"\r{text}" + ("\n" if finished else ""))
        else:
            tenths = 10 if finished else progress.bytes_done * 10 // max(progress.bytes, 1)
            if tenths <= self.tenths_shown:
                return
            self.tenths_shown = tenths
            self.stream.write(f"{text}\n")
        self.stream.flush()
