"""Structured logs: one event per line, JSON unless a person is watching a terminal.

Records from the standard library (aiohttp's own) pass through the same renderer, so the
stream stays one format.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import sys
import threading
from datetime import datetime, timezone
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


PENDING_LINES = 4096   # lines waiting for a log reader that is not reading: about 1 MiB
EXIT_FLUSH = 1.0       # seconds given, at exit, to lines still waiting


class _Survivable:
    """A log stream that never holds up the process that logs: lines go to a writer thread
    through a bounded queue. A reader that stops reading (a stuck journald, a paused pager,
    Ctrl-S on a terminal) costs lines, dropped and then counted in a ``log_lines_dropped`` line,
    never a blocked event loop; a reader that goes away sends the rest to /dev/null. Nothing that
    logs (a signal handler, the proxy) ever sees a write fail or wait."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None   # not a file (a test's buffer): written through the stream
        self.as_json = True
        self._line = ""
        self._lines: queue.Queue = queue.Queue(PENDING_LINES)
        self._dropped = 0    # written by the logging thread only
        self._reported = 0   # written by the writer thread only
        threading.Thread(target=self._write_lines, name="autosleepd-log", daemon=True).start()

    def write(self, text: str) -> None:
        # A whole line in one write: worker processes share the stream, and lines written in
        # one piece (up to the pipe's 4 KiB) never interleave (print() sends the newline apart).
        self._line += text
        if not self._line.endswith("\n"):
            return
        text, self._line = self._line, ""
        try:
            self._lines.put_nowait(text)
        except queue.Full:
            self._dropped += 1

    def flush(self) -> None:
        pass   # lines go out as the reader takes them

    def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the lines logged so far to be written."""
        written = threading.Event()
        try:
            self._lines.put(written, timeout=timeout)
        except queue.Full:
            return
        written.wait(timeout)

    def isatty(self) -> bool:
        return self._stream.isatty()

    def _write_lines(self) -> None:
        while True:
            line = self._lines.get()
            if isinstance(line, threading.Event):
                line.set()
                continue
            dropped = self._dropped - self._reported
            if dropped:
                self._reported += dropped
                self._emit(self._dropped_line(dropped))
            self._emit(line)

    def _dropped_line(self, count: int) -> str:
        event = {"event": "log_lines_dropped", "count": count, "level": "warning",
                 "timestamp": datetime.now(timezone.utc).isoformat(),
                 "hint": "the log's reader did not read for a while; these lines were dropped"}
        if self.as_json:
            return json.dumps(event) + "\n"
        return f"{event['timestamp']} [warning  ] log_lines_dropped count={count}\n"

    def _emit(self, text: str) -> None:
        try:
            if self._fd is None:
                self._stream.write(text)
                self._stream.flush()
                return
            data = text.encode("utf-8", "backslashreplace")
            while data:   # straight to the descriptor: no lock of sys.stderr held while blocked
                try:
                    data = data[os.write(self._fd, data):]
                except BlockingIOError:   # a descriptor its starter left non-blocking: wait
                    select.select([], [self._fd], [])
        except (BrokenPipeError, ConnectionResetError):
            # Point the descriptor at /dev/null, so the text still buffered flushes at exit too.
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except OSError:
            pass   # a full disk (ENOSPC), a hung-up terminal (EIO): this line is lost, not the log


_streams: list[_Survivable] = []


def drain(timeout: float = EXIT_FLUSH) -> None:
    """Let the lines logged so far reach the log (at most ``timeout``): before an exit."""
    for stream in _streams:
        stream.drain(timeout)


atexit.register(drain)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = _Survivable(stream or sys.stderr)
    _streams[:] = [stream]
    as_json = stream.as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer = (structlog.processors.JSONRenderer() if as_json
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=shared + [structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared + [structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.INFO))
