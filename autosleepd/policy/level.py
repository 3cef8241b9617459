"""AUTOSLEEPD_SLEEP_LEVEL=auto: the level of each idle sleep, chosen from measurements.

Pure code: ``choose_level`` answers from the inputs it is given; ``LevelTimes`` keeps the sleep
and wake times measured per level. The rule (the README says the same):

1. Level 1 copies the weights into host RAM: it is allowed only when the host has the weights'
   size free, plus the margin (an unknown size allows it: the first level-1 sleep learns it).
2. The quiet period expected ahead: until traffic usually comes back (the pre-wake learner), else
   as long as the quiet so far (a quiet that has lasted T is expected to last about T more).
3. A level fits when its sleep plus wake is shorter than the quiet ahead (else the engine would
   be woken before the sleep was done). No allowed level fits: no sleep now (asked again after
   another idle window).
4. One allowed level fits: that one (level 2 when the host RAM cannot take level 1).
5. Both fit: level 2 when its extra wake time over level 1 is at most 1/1000 of the quiet ahead
   (one more second for the first request per 17 minutes of host RAM given back); else level 1.

Times are the median of the last five measured (so a slow first level-1 sleep does not decide
alone); until a level has been measured, the priors below stand in: vLLM 0.26 on an H200 with
Qwen3-8B's shape (the sleep contract): level 1 slept in 8.05 s (a first sleep) and woke in 0.76 s;
level 2 slept in 0.05 s and woke in 2.34 s (weights 0.03 s, reload 1.99 s, KV cache 0.32 s).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

PRIOR_SLEEP = {1: 8.05, 2: 0.05}
PRIOR_WAKE = {1: 0.76, 2: 2.34}
KEPT = 5
EXTRA_WAKE_PER_QUIET = 1 / 1000


@dataclass
class LevelTimes:
    """Sleep and wake seconds measured per level; the priors until there are some."""

    sleeps: dict[int, deque] = field(default_factory=lambda: {1: deque(maxlen=KEPT), 2: deque(maxlen=KEPT)})
    wakes: dict[int, deque] = field(default_factory=lambda: {1: deque(maxlen=KEPT), 2: deque(maxlen=KEPT)})

    def record_sleep(self, level: int, seconds: float) -> None:
        if level in self.sleeps:
            self.sleeps[level].append(seconds)

    def record_wake(self, level: int, seconds: float) -> None:
        if level in self.wakes:
            self.wakes[level].append(seconds)

    def sleep(self, level: int) -> float:
        seen = self.sleeps[level]
        return statistics.median(seen) if seen else PRIOR_SLEEP[level]

    def wake(self, level: int) -> float:
        seen = self.wakes[level]
        return statistics.median(seen) if seen else PRIOR_WAKE[level]

    def as_dict(self) -> dict:
        return {str(level): {"sleep_s": round(self.sleep(level), 3), "wake_s": round(self.wake(level), 3),
                             "measured": len(self.sleeps[level]) + len(self.wakes[level])}
                for level in (1, 2)}


@dataclass(frozen=True)
class LevelInputs:
    times: LevelTimes
    quiet_so_far: float               # seconds since the last work
    resumes_in: float | None          # seconds until traffic usually comes back; None: unknown
    host_available: int | None        # host RAM available, bytes; None: unknown
    weights: int | None               # host RAM a level-1 sleep takes; None: unknown
    margin: int = 0

    def as_log(self) -> dict:
        return {"quiet_so_far_s": round(self.quiet_so_far, 1),
                "resumes_in_s": None if self.resumes_in is None else round(self.resumes_in, 1),
                "host_available_bytes": self.host_available, "weights_bytes": self.weights,
                "times": self.times.as_dict()}


@dataclass(frozen=True)
class LevelChoice:
    level: int | None                 # None: do not sleep now
    reason: str


def choose_level(inputs: LevelInputs) -> LevelChoice:
    t = inputs.times
    level1 = (inputs.weights is None or inputs.host_available is None
              or inputs.host_available >= inputs.weights + inputs.margin)
    if inputs.resumes_in is not None:
        quiet, source = inputs.resumes_in, "traffic usually comes back"
    else:
        quiet, source = inputs.quiet_so_far, "as long as the quiet so far"
    ahead = f"quiet expected for {quiet:.0f}s ({source})"
    allowed = (1, 2) if level1 else (2,)
    fits = [level for level in allowed if t.sleep(level) + t.wake(level) <= quiet]
    if not fits:
        fastest = min(allowed, key=lambda level: t.sleep(level) + t.wake(level))
        return LevelChoice(None, f"{ahead}: shorter than a level-{fastest} sleep and wake "
                                 f"({t.sleep(fastest) + t.wake(fastest):.2f}s)")
    if not level1:
        return LevelChoice(2, f"host RAM has {inputs.host_available / 2**30:.1f} GiB available, a "
                              f"level-1 sleep copies {inputs.weights / 2**30:.1f} GiB of weights; {ahead}")
    if fits == [2]:
        return LevelChoice(2, f"{ahead}: only a level-2 sleep and wake ({t.sleep(2) + t.wake(2):.2f}s) "
                              f"fit in it, not level 1's ({t.sleep(1) + t.wake(1):.2f}s)")
    if fits == [1]:
        return LevelChoice(1, f"{ahead}: only a level-1 sleep and wake ({t.sleep(1) + t.wake(1):.2f}s) "
                              f"fit in it, not level 2's ({t.sleep(2) + t.wake(2):.2f}s)")
    extra = t.wake(2) - t.wake(1)
    if extra <= quiet * EXTRA_WAKE_PER_QUIET:
        return LevelChoice(2, f"{ahead}: level 2's wake takes {extra:.2f}s more than level 1's, "
                              f"at most 1/1000 of it; host RAM is given back")
    return LevelChoice(1, f"{ahead}: level 2's wake would take {extra:.2f}s more than level 1's, "
                          f"over 1/1000 of it")
