"""Running ``AUTOSLEEPD_ENGINE_RESTART_COMMAND`` for a broken engine, with its output logged."""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

RESTART_COMMAND_TIMEOUT = 300.0


class CommandRestarter:
    def __init__(self, command: str, timeout: float = RESTART_COMMAND_TIMEOUT):
        self.command = command
        self._timeout = timeout
        self._log = structlog.get_logger("autosleepd.restart")

    async def __call__(self) -> bool:
        self._log.warning("engine_restart", command=self.command)
        # Its own process group, so a timeout kills the command and everything it started.
        process = await asyncio.create_subprocess_shell(
            self.command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            self._log.error("engine_restart_timeout", command=self.command, seconds=self._timeout)
            return False
        text = output.decode(errors="replace")[-4000:]
        if process.returncode == 0:
            self._log.info("engine_restart_done", exit_status=0, output=text)
        else:
            self._log.error("engine_restart_failed", exit_status=process.returncode, output=text)
        return process.returncode == 0
