"""Structured logs: one event per line, JSON unless a person is watching a terminal.

Records from the standard library (aiohttp's own) pass through the same renderer, so the
stream stays one format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _Survivable:
    """A log stream whose reader may go away: then the logs go to /dev/null, and nothing that
    logs (a signal handler, the proxy) ever sees the write fail."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._line = ""

    def write(self, text: str) -> None:
        # A whole line in one write: worker processes share the stream, and lines written in
        # one piece (up to the pipe's 4 KiB) never interleave (print() sends the newline apart).
        self._line += text
        if not self._line.endswith("\n"):
            return
        text, self._line = self._line, ""
        try:
            self._stream.write(text)
            self._stream.flush()
        except (BrokenPipeError, ConnectionResetError):
            # Point the descriptor at /dev/null, so the text still buffered flushes at exit too.
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def flush(self) -> None:
        pass   # every write is flushed

    def isatty(self) -> bool:
        return self._stream.isatty()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = _Survivable(stream or sys.stderr)
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
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
