"""Proof that an engine reporting awake really serves: AUTOSLEEPD_WAKE_CHECK.

- ``state``: nothing beyond ``/is_sleeping``;
- ``request``: a one-token completion, sent beside the released work (it costs them nothing);
- ``fingerprint``: a fixed greedy prompt whose token ids are recorded when a (re)started engine is
  first seen awake, and compared after every wake before any held work is released. vLLM can
  answer wrong output after a wake while ``/health`` says 200 (#53888, #29341).

A 401 or 403 on autosleepd's own call is a configuration error (the engine's API key is not
set), said once and kept in status; it never makes the engine broken.
"""

from __future__ import annotations

import structlog

from .engine import EngineAuthError, EngineError

CHECK_TIMEOUT = 60.0


class Checker:
    def __init__(self, mode: str, engine):
        self.mode = mode
        self._engine = engine
        self.reference: tuple | None = None   # the fingerprint of the engine as first seen
        self.config_error: str | None = None
        self._log = structlog.get_logger("autosleepd.check")

    @property
    def before_release(self) -> bool:
        """The check runs before held work is released (else beside it)."""
        return self.mode == "fingerprint"

    async def record(self) -> None:
        """A (re)started engine is seen awake: remember what it answers."""
        if self.mode != "fingerprint":
            return
        try:
            self.reference = tuple(await self._engine.fingerprint(timeout=CHECK_TIMEOUT))
        except EngineAuthError as error:
            self._configuration_error(error)
        except EngineError as error:
            self.reference = None
            self._log.warning("fingerprint_not_recorded", error=str(error))
            return
        self._log.info("fingerprint_recorded", tokens=len(self.reference or ()))

    async def verify(self) -> str | None:
        """None if the engine passes; else what went wrong, in words."""
        try:
            if self.mode == "request":
                await self._engine.check_inference(timeout=CHECK_TIMEOUT)
            elif self.mode == "fingerprint":
                if self.reference is None:
                    await self.record()
                    return None
                answer = tuple(await self._engine.fingerprint(timeout=CHECK_TIMEOUT))
                if answer != self.reference:
                    return (f"the fingerprint changed after the wake: expected "
                            f"{list(self.reference)}, got {list(answer)}")
        except EngineAuthError as error:
            self._configuration_error(error)
        except EngineError as error:
            kind = "one-token completion" if self.mode == "request" else "fingerprint"
            return f"awake, but the {kind} failed: {error}"
        return None

    def _configuration_error(self, error: EngineAuthError) -> None:
        if self.config_error is None:
            self._log.error("engine_refused_autosleepd", error=str(error),
                            hint="set AUTOSLEEPD_UPSTREAM_API_KEY (or _FILE) to the engine's "
                                 "--api-key; the check is skipped meanwhile")
        self.config_error = str(error)
