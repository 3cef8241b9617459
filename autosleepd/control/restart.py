"""Running an operator's command (restart, stop, start) with a timeout, its output logged."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from dataclasses import dataclass

import structlog

RESTART_COMMAND_TIMEOUT = 300.0
OUTPUT_KEPT = 4000   # the last characters of a command's output that reach the log


@dataclass(frozen=True)
class CommandResult:
    exit_status: int | None   # None: killed at its timeout
    output: str               # its last OUTPUT_KEPT characters, secrets masked


def mask(text: str, secrets) -> str:
    """``text`` with every secret (the engine's API key, the admin token) replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def command_env(config) -> dict[str, str]:
    """What an operator's command is told about its engine, so that one command serves every
    engine of a host: ``systemctl stop "vllm@$AUTOSLEEPD_ENGINE"``."""
    return {**os.environ, "AUTOSLEEPD_ENGINE": config.engine_name or "",
            "AUTOSLEEPD_ENGINE_URL": config.upstream}


async def run_command(command: str, timeout: float, secrets=(), env=None) -> CommandResult:
    """Run ``command`` in a shell in its own process group; a timeout kills the whole group.

    Done means the shell exited, not that its output ended: a start command that launches the
    engine in the background (``... &``) leaves a child holding the output open for good (uvloop
    even leaks its end of the pipe into children that redirect theirs), so the output goes to a
    file, read once the shell is gone."""
    with tempfile.TemporaryFile() as output:
        process = await asyncio.create_subprocess_shell(
            command, stdout=output, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            await _kill(process)
            return CommandResult(None, "")
        except asyncio.CancelledError:   # autosleepd shuts down: leave nothing running behind
            await asyncio.shield(_kill(process))
            raise
        output.seek(max(0, os.fstat(output.fileno()).st_size - 4 * OUTPUT_KEPT))
        text = output.read().decode(errors="replace")
    # Masked before it is cut: a secret across the cut would show its tail.
    return CommandResult(process.returncode, mask(text, secrets)[-OUTPUT_KEPT:])


async def _kill(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await process.wait()


class CommandRestarter:
    def __init__(self, command: str, timeout: float = RESTART_COMMAND_TIMEOUT, secrets=(), env=None):
        self.command, self._env = command, env
        self._timeout = timeout
        self._secrets = tuple(secrets)
        self._log = structlog.get_logger("autosleepd.restart")

    async def __call__(self) -> bool:
        self._log.warning("engine_restart", command=mask(self.command, self._secrets))
        result = await run_command(self.command, self._timeout, self._secrets, self._env)
        if result.exit_status is None:
            self._log.error("engine_restart_timeout", command=mask(self.command, self._secrets),
                            seconds=self._timeout)
        elif result.exit_status == 0:
            self._log.info("engine_restart_done", exit_status=0, output=result.output)
        else:
            self._log.error("engine_restart_failed", exit_status=result.exit_status,
                            output=result.output)
        return result.exit_status == 0
