"""The stop rung's two procedures: stop the engine's process, and start it again; one outcome each.

``stop_engine`` runs in ``stopping``: AUTOSLEEPD_ENGINE_STOP_COMMAND, then the engine must refuse
connections (its process is gone, and with it the CUDA context that keeps an idle GPU drawing
about 45 W more). What decides the outcome is the engine as read afterwards, not the command's
exit status alone: a command that failed while the port refuses still left the engine stopped.

``start_engine`` runs in ``launching``: AUTOSLEEPD_ENGINE_START_COMMAND (it must return once the
engine is launched, as ``systemctl start`` does), then ``/health`` is polled until it answers
200, then the engine is read and checked as after a wake. All of it within
AUTOSLEEPD_ENGINE_START_TIMEOUT; an engine still not healthy then is stopped again, so the next
start begins clean. The commands' output is logged with secrets masked.
"""

from __future__ import annotations

import asyncio

import structlog

from .engine import EngineError
from .probe import PROBE_TIMEOUT, port_refuses
from .restart import CommandResult, command_env, mask, run_command
from .states import Event, Outcome

POLL = 0.5   # between two readings of an engine that is going away or coming up

_log = structlog.get_logger("autosleepd.stop")


def _secrets(config) -> tuple:
    return (config.upstream_api_key, config.admin_token)


async def _run(config, what: str, command: str, timeout: float) -> CommandResult:
    secrets = _secrets(config)
    _log.info(f"engine_{what}_command", command=mask(command, secrets))
    result = await run_command(command, timeout, secrets, command_env(config))
    if result.exit_status == 0:
        _log.info(f"engine_{what}_command_done", exit_status=0, output=result.output)
    else:
        _log.error(f"engine_{what}_command_failed", exit_status=result.exit_status,
                   output=result.output, timeout_s=timeout if result.exit_status is None else None)
    return result


def _failed(result: CommandResult, variable: str, timeout: float) -> str:
    if result.exit_status is None:
        return f"{variable} did not finish within {timeout:g}s (killed)"
    return f"{variable} exited with status {result.exit_status}"


async def pause(clock, until: float) -> None:
    """Wait for clock time ``until``, whatever else happens meanwhile."""
    done = asyncio.get_running_loop().create_future()
    timer = clock.call_at(until, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        timer.cancel()


async def stop_engine(owner) -> Outcome:
    """``owner`` is the Supervisor: its clock, config and prober."""
    clock, config = owner.clock, owner.config
    started = clock.now()
    deadline = started + config.engine_stop_timeout
    result = await _run(config, "stop", config.stop_command, config.engine_stop_timeout)
    while True:
        found = await owner.prober.read_engine()
        if port_refuses(found):
            detail = None if result.exit_status == 0 else (
                _failed(result, "AUTOSLEEPD_ENGINE_STOP_COMMAND", config.engine_stop_timeout)
                + ", but the engine is gone")
            return Outcome(Event.ENGINE_STOPPED, detail, seconds=clock.now() - started,
                           exit_status=result.exit_status)
        # Found awake: woken behind our back, so it is not stopping; followed at once (the
        # work held meanwhile must not wait out the stop's timeout).
        if result.exit_status != 0 or found is False or clock.now() >= deadline:
            why = (_failed(result, "AUTOSLEEPD_ENGINE_STOP_COMMAND", config.engine_stop_timeout)
                   if result.exit_status != 0 else
                   "the engine answers awake after AUTOSLEEPD_ENGINE_STOP_COMMAND" if found is False
                   else f"the engine still answers {config.engine_stop_timeout:g}s after "
                   "AUTOSLEEPD_ENGINE_STOP_COMMAND")
            if found is False:
                return Outcome(Event.FOUND_AWAKE, why, exit_status=result.exit_status)
            return Outcome(Event.STOP_FAILED, why, exit_status=result.exit_status)
        await pause(clock, min(deadline, clock.now() + POLL))


async def start_engine(owner) -> Outcome:
    """``owner`` is the Supervisor: its clock, config, engine, prober and checker."""
    clock, config = owner.clock, owner.config
    started = clock.now()
    limit = config.engine_start_timeout
    deadline = started + limit
    result = await _run(config, "start", config.start_command, limit)
    if result.exit_status != 0:
        return Outcome(Event.START_FAILED, _failed(result, "AUTOSLEEPD_ENGINE_START_COMMAND", limit),
                       seconds=clock.now() - started, exit_status=result.exit_status)
    last_error = "no answer yet"
    while True:
        try:
            await owner.engine.health(timeout=PROBE_TIMEOUT)
            found = await owner.prober.read_engine()
            if not isinstance(found, EngineError):
                break
            last_error = str(found)
        except EngineError as error:
            last_error = str(error)
        if clock.now() >= deadline:
            _log.error("engine_start_timeout", timeout_s=limit, last_error=last_error)
            await _run(config, "stop", config.stop_command, config.engine_stop_timeout)
            return Outcome(Event.START_FAILED, f"the engine was not healthy within "
                           f"AUTOSLEEPD_ENGINE_START_TIMEOUT={limit:g}s ({last_error}); "
                           "it was stopped again", seconds=clock.now() - started, exit_status=0)
        await pause(clock, min(deadline, clock.now() + POLL))
    seconds = clock.now() - started
    if found:
        return Outcome(Event.FOUND_ASLEEP, "the started engine is asleep", seconds=seconds)
    owner.checker.reference = None   # a fresh engine: a fingerprint check records it now
    failure = await owner.checker.verify()
    if failure is not None:
        return Outcome(Event.CHECK_FAILED, failure, seconds=seconds)
    return Outcome(Event.ENGINE_STARTED, seconds=clock.now() - started, exit_status=0)
