"""A job's log within a cap: its head and its newest part, and a line saying what was
dropped between them. One job printing without end must not fill the disk under
GPUQ_HOME and stall the stack.

The first half of the cap is the head, written once and never moved. Past it, output
goes on at the end until the file would pass the cap; then the oldest part after the head
is dropped, leaving the newest quarter of the cap, behind one line:

    == gpuq: 123456 bytes dropped ==

Dropping moves that quarter once per quarter written, so a log costs at most twice its
writes. The file itself holds the whole state (the head's size follows from the cap, the
count from the line), so every attempt of a job appends to the same log, whichever writer
wrote before.

The standard library only: an attachable (tmux) job's pane runs this file as the writer
of its log (`python logcap.py LOG CAP`: standard input to the log and to the pane).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import sys
import threading
from pathlib import Path

MARKER = re.compile(rb"\n== gpuq: (\d+) bytes dropped ==\n")
MARKER_SCAN_BYTES = 64  # the marker line is shorter than this
COPY_CHUNK_BYTES = 1 << 20
READ_CHUNK_BYTES = 1 << 16
SMALLEST_CAP_BYTES = 4096

logger = logging.getLogger(__name__)


def marker(dropped: int) -> bytes:
    return b"\n== gpuq: %d bytes dropped ==\n" % dropped


def head_bytes(cap_bytes: int) -> int:
    """Where the head ends and, once anything was dropped, the marker line starts."""
    return cap_bytes // 2


class CappedLog:
    """Appends to the log at `path`, keeping it within `cap_bytes`."""

    def __init__(self, path: Path, cap_bytes: int) -> None:
        if cap_bytes < SMALLEST_CAP_BYTES:
            raise ValueError(f"a log cap is at least {SMALLEST_CAP_BYTES} bytes")
        self.cap, self.head, self.keep = cap_bytes, head_bytes(cap_bytes), cap_bytes // 4
        # 0600 from its creation: a job's output is its owner's (app.core.paths.LOG_MODE;
        # this file runs alone in a tmux pane, so it imports nothing of gpuq's).
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.load()

    def load(self) -> None:
        """Read the log's state from the file: its size, and the marker's count if any."""
        self.size = os.fstat(self.fd).st_size
        self.dropped, self.tail_from = 0, self.head
        if self.size > self.head:
            found = MARKER.match(os.pread(self.fd, MARKER_SCAN_BYTES, self.head))
            if found:
                self.dropped, self.tail_from = int(found[1]), self.head + found.end()

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.cap and self.size < self.head:
            fill = self.head - self.size  # the head is kept whole, whatever comes after it
            self._append(data[:fill])
            data = data[fill:]
        if self.size + len(data) > self.cap:
            self._drop_oldest(data)
        else:
            self._append(data)

    def _append(self, data: bytes) -> None:
        _write_all(self.fd, data, self.size)
        self.size += len(data)

    def _drop_oldest(self, data: bytes) -> None:
        """Leave the head, the marker with its new count, and the newest `keep` bytes of
        what followed the head with `data` after it."""
        on_file = self.size - self.tail_from
        self.dropped += on_file + len(data) - self.keep
        line = marker(self.dropped)
        at = self.head + len(line)
        # The newest part of what is on file, moved to just after the marker: the file
        # passed the cap, so it starts well after the marker's end.
        kept = max(min(self.keep - len(data), on_file), 0)
        self._move(self.size - kept, self.size, at)
        _write_all(self.fd, line, self.head)
        new = data[-self.keep:]
        _write_all(self.fd, new, at + kept)
        self.size, self.tail_from = at + kept + len(new), at
        os.ftruncate(self.fd, self.size)

    def _move(self, start: int, end: int, to: int) -> None:
        """Copy the file's bytes [start, end) to `to` (to <= start: front to back is safe).
        The copy may overlap the marker's place only where the marker is then written."""
        while start < end:
            chunk = os.pread(self.fd, min(COPY_CHUNK_BYTES, end - start), start)
            _write_all(self.fd, chunk, to)
            start, to = start + len(chunk), to + len(chunk)

    def close(self) -> None:
        os.close(self.fd)


def _write_all(fd: int, data: bytes, at: int) -> None:
    """pwrite may write part of `data` (a disk filling up): write on until all is written
    or it fails."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, at)
        view, at = view[written:], at + written


def write_or_drop(capped: CappedLog, data: bytes) -> bool:
    """Write to the log; when the disk refuses (full, gone), drop the output instead and
    say so (False): a job must never stall on a pipe that nobody reads."""
    try:
        capped.write(data)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            capped.load()  # a write may have gone in part: carry on from what the file holds
        return False


def append(path: Path, data: bytes, cap_bytes: int) -> None:
    """Append one piece (gpuq's own lines: an attempt's header, a preflight's output)."""
    log = CappedLog(path, cap_bytes)
    try:
        log.write(data)
    finally:
        log.close()


class Pump(threading.Thread):
    """Copies a job's output from the read end of its pipe into its capped log, on a thread
    of the worker that watches the job: no process of its own."""

    def __init__(self, read_fd: int, log: CappedLog) -> None:
        super().__init__(name=f"log-pump-{read_fd}", daemon=True)
        self.read_fd, self.log = read_fd, log
        self.stopping = threading.Event()
        self.lost_bytes = 0  # output dropped because the log could not be written

    def run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.read_fd], [], [], 0.2)
                if not ready:
                    if self.stopping.is_set():
                        return  # nothing left to read, and the job has ended
                    continue
                data = os.read(self.read_fd, READ_CHUNK_BYTES)
                if not data:
                    return  # every writer closed its end
                self._write(data)
        finally:
            os.close(self.read_fd)
            self.log.close()

    def _write(self, data: bytes) -> None:
        if not write_or_drop(self.log, data):
            if not self.lost_bytes:
                logger.warning("a job's log cannot be written; its output is dropped until "
                               "it can")
            self.lost_bytes += len(data)

    def finish(self, timeout_s: float = 5.0) -> None:
        """Read what is left once the job's processes are gone; a process that escaped the
        job's group and still holds the pipe is not waited for."""
        self.stopping.set()
        self.join(timeout_s)


def tee(cap_bytes: int, path: Path) -> None:
    """Standard input to standard output and to the capped log, until end of input."""
    log = CappedLog(path, cap_bytes)
    out = sys.stdout.buffer
    try:
        while data := os.read(0, READ_CHUNK_BYTES):
            write_or_drop(log, data)
            try:
                out.write(data)
                out.flush()
            except OSError:  # the pane is gone: the log still gets the output
                pass
    finally:
        log.close()


if __name__ == "__main__":
    tee(int(sys.argv[2]), Path(sys.argv[1]))
