"""Prometheus metrics, all named ``autosleepd_*``, served at ``GET /autosleepd/metrics``.

Counters and histograms move as the supervisor reports events (it calls the ``Observer``
methods); gauges of the present (state, in flight, held, idle seconds) are read from the
supervisor at scrape time, so they can never drift from the truth.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .control.status import Status
from .control.supervisor import Observer, Refused, State

disable_created_metrics()   # the *_created series only double the size of every scrape

# Wakes of a small model take 0.1-0.8 s, of a large one 3-6 s; a level-2 reload 2-100 s.
# Real wakes and sleeps take 50 ms (level 2 of a small model) to 10 minutes (a first level-1
# sleep, a reload from a slow disk). Neighbouring edges are at most 1.5x apart, and 1.25x where
# most wakes fall (0.5-5 s), so a quantile read from them is within a few tenths of the truth.
TRANSITION_BUCKETS = (0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1, 1.25, 1.5, 1.75,
                      2, 2.5, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600)
HOLD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120,
                300, 600)


class Metrics(Observer):
    """The supervisor's and the proxy's observer, and the owner of the registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sleeps = Counter("autosleepd_sleeps_total", "Sleeps completed, by level and reason.",
                              ["level", "reason"], registry=r)
        self.wakes = Counter("autosleepd_wakes_total", "Wakes completed, by level and reason.",
                             ["level", "reason"], registry=r)
        self.sleep_failures = Counter("autosleepd_sleep_failures_total", "Sleep calls that failed.",
                                      registry=r)
        self.wake_failures = Counter("autosleepd_wake_failures_total", "Wake calls that failed.",
                                     registry=r)
        self.sleep_seconds = Histogram("autosleepd_sleep_duration_seconds",
                                       "Time from the decision to sleep to the engine asleep.",
                                       ["level"], buckets=TRANSITION_BUCKETS, registry=r)
        self.wake_seconds = Histogram("autosleepd_wake_duration_seconds",
                                      "Time from the decision to wake to the engine awake.",
                                      ["level"], buckets=TRANSITION_BUCKETS, registry=r)
        self.held_seconds = Histogram("autosleepd_hold_duration_seconds",
                                      "Time a request was held before it was forwarded.",
                                      buckets=HOLD_BUCKETS, registry=r)
        self.refused = Counter("autosleepd_requests_refused_total",
                               "Requests answered by autosleepd with an error, by reason.",
                               ["reason"], registry=r)
        self.proxied = Counter("autosleepd_requests_total", "Requests handled, by class "
                               "(work, passive, blocked) and status class.", ["kind", "code"],
                               registry=r)
        self.abandoned = Counter("autosleepd_held_abandoned_total",
                                 "Held requests whose client went away before the engine woke.",
                                 registry=r)
        self.transitions = Counter("autosleepd_transitions_total", "State transitions.",
                                   ["from_state", "to_state"], registry=r)
        self.memory_waits = Counter("autosleepd_memory_waits_total",
                                    "Wakes that had to wait for GPU memory.", registry=r)
        self.restarts = Counter("autosleepd_engine_restarts_total",
                                "Runs of the restart command for a broken engine, by outcome.",
                                ["outcome"], registry=r)
        self.stops = Counter("autosleepd_engine_stops_total",
                             "Engine processes stopped at the ladder's stop rung.", registry=r)
        self.starts = Counter("autosleepd_engine_starts_total",
                              "Starts of a stopped engine, by outcome.", ["outcome"], registry=r)
        self.start_seconds = Histogram("autosleepd_engine_start_duration_seconds",
                                       "A cold start: the start command, /health, the check.",
                                       buckets=TRANSITION_BUCKETS, registry=r)
        self.worker_exits = Counter("autosleepd_worker_exits_total", "Worker processes "
                                    "(AUTOSLEEPD_WORKERS) that exited unasked; each is restarted.",
                                    registry=r)
        for reason in (*Refused.REASONS, "blocked_path"):
            self.refused.labels(reason)
        self._read_status: Callable[[], Status] | None = None
        self._read_coordination: Callable[[], dict] | None = None
        self._proxied_children: dict = {}
        self.registry.register(_LiveCollector(self))

    def watch(self, read_status: Callable[[], Status],
              read_coordination: Callable[[], dict] | None = None,
              read_pin: Callable[[float], dict | None] | None = None) -> None:
        """Where scrape-time gauges come from: the supervisor's status (and the neighbours',
        and the pin's at a time)."""
        self._read_status = read_status
        self._read_coordination = read_coordination
        self._read_pin = read_pin

    # ----- the supervisor's Observer ---------------------------------------------------------

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None:
        self.transitions.labels(old.value, new.value).inc()

    def slept(self, level: int, reason: str, seconds: float) -> None:
        self.sleeps.labels(str(level), reason).inc()
        self.sleep_seconds.labels(str(level)).observe(seconds)

    def woke(self, level: int, reason: str, seconds: float) -> None:
        self.wakes.labels(str(level), reason).inc()
        self.wake_seconds.labels(str(level)).observe(seconds)

    def sleep_failed(self) -> None:
        self.sleep_failures.inc()

    def wake_failed(self) -> None:
        self.wake_failures.inc()

    def memory_wait(self) -> None:
        self.memory_waits.inc()

    def restarted(self, ok: bool) -> None:
        self.restarts.labels("ok" if ok else "failed").inc()

    def engine_stopped(self, seconds: float) -> None:
        self.stops.inc()

    def engine_started(self, ok: bool, seconds: float) -> None:
        self.starts.labels("ok" if ok else "failed").inc()
        if ok:
            self.start_seconds.observe(seconds)

    def held_abandoned(self) -> None:
        self.abandoned.inc()

    def released(self, held_seconds: float) -> None:
        self.held_seconds.observe(held_seconds)

    def refused_request(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    # ----- the proxy's observer --------------------------------------------------------------

    def request(self, kind: str, status: int, count: int = 1) -> None:
        """``count``: how many, where worker processes report them in bulk."""
        key = (kind, status // 100)
        counter = self._proxied_children.get(key)
        if counter is None:   # labels() costs a lock and a lookup: once per (kind, class)
            counter = self._proxied_children[key] = self.proxied.labels(kind, f"{status // 100}xx")
        counter.inc(count)
        if kind == "blocked":
            self.refused.labels("blocked_path").inc(count)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


class _LiveCollector:
    """Gauges read at scrape time, from the supervisor's status snapshot."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        if self._metrics._read_status is None:
            return
        live: Status = self._metrics._read_status()
        state = GaugeMetricFamily("autosleepd_state", "1 for the engine's current state, 0 for "
                                  "the others.", labels=["state"])
        for candidate in State:
            state.add_metric([candidate.value], 1.0 if live.state is candidate else 0.0)
        yield state
        for name, value, text in (
                ("autosleepd_requests_in_flight", live.in_flight, "Work requests being forwarded now."),
                ("autosleepd_requests_held", live.queued, "Work requests held now, waiting for the engine."),
                ("autosleepd_idle_seconds", live.idle_seconds, "Seconds since the last work ended "
                                                               "(0 while any is in flight or held)."),
                ("autosleepd_sleep_supported", live.sleep_supported, "1 if the engine can sleep."),
                ("autosleepd_engine_cycles", live.cycles, "Sleeps since the engine was (re)started."),
                ("autosleepd_config_error", live.stats.config_error is not None,
                 "1 while the engine refuses autosleepd's own calls (its API key is not set).")):
            yield GaugeMetricFamily(name, text, value=float(value))
        memory = live.memory or {}
        for name, key, text in (
                ("autosleepd_engine_memory_awake_bytes", "engine_awake_bytes",
                 "GPU memory the engine holds awake, as learned, per GPU."),
                ("autosleepd_asleep_residual_bytes", "engine_asleep_bytes",
                 "GPU memory the engine kept at its last sleep, per GPU (its growth is drift).")):
            family = GaugeMetricFamily(name, text, labels=["gpu"])
            for uuid, amount in sorted(memory.get(key, {}).items()):
                family.add_metric([uuid], float(amount))
            yield family
        gpus = GaugeMetricFamily("autosleepd_gpu_memory_free_bytes",
                                 "Free memory per GPU at the last reading.", labels=["gpu"])
        total = GaugeMetricFamily("autosleepd_gpu_memory_total_bytes",
                                  "Total memory per GPU.", labels=["gpu"])
        for gpu in memory.get("gpus", []):
            gpus.add_metric([gpu["uuid"]], float(gpu["free_bytes"]))
            total.add_metric([gpu["uuid"]], float(gpu["total_bytes"]))
        yield gpus
        yield total
        yield GaugeMetricFamily("autosleepd_waiting_for_memory", "1 while a wake waits for GPU "
                                "memory.", value=1.0 if live.waiting_for_memory else 0.0)
        coordination = self._metrics._read_coordination() if self._metrics._read_coordination else None
        if coordination:
            for name, key in (("autosleepd_evictions_asked", "evictions_asked"),
                              ("autosleepd_evictions_done", "evictions_done")):
                yield CounterMetricFamily(name, f"Neighbours this sidecar asked to sleep ({key}).",
                                          value=float(coordination[key]))
        prewakes = CounterMetricFamily("autosleepd_prewakes_judged",
                                       "Learned pre-wakes, by whether work came before the next "
                                       "sleep.", labels=["outcome"])
        if live.prewakes_used is not None:
            prewakes.add_metric(["used"], float(live.prewakes_used))
            prewakes.add_metric(["wasted"], float(live.prewakes_wasted))
        yield prewakes
        ladder = CounterMetricFamily("autosleepd_ladder_steps", "Steps down the sleep ladder.",
                                     labels=["outcome"])
        ladder.add_metric(["done"], float(live.stats.ladder_steps))
        ladder.add_metric(["skipped"], float(live.stats.ladder_skips))
        yield ladder
        for name, value, text in (
                ("autosleepd_recycles", live.stats.recycles,
                 "Restarts of an asleep engine whose leftover memory grew, or that reached its age."),
                ("autosleepd_wake_check_failures", live.stats.check_failures,
                 "Wakes whose output check (one-token or fingerprint) failed.")):
            yield CounterMetricFamily(name, text, value=float(value))
        if self._metrics._read_pin is not None:
            pin = self._metrics._read_pin(live.now)
            yield GaugeMetricFamily("autosleepd_pinned", "1 while an operator's pin keeps the "
                                    "engine awake.", value=0.0 if pin is None else 1.0)
            yield GaugeMetricFamily("autosleepd_pin_remaining_seconds", "Seconds the pin still "
                                    "holds (0: no pin; -1: until unpinned).",
                                    value=0.0 if pin is None else
                                    -1.0 if pin["in_seconds"] is None else float(pin["in_seconds"]))
        upcoming = live.next_transition
        yield GaugeMetricFamily("autosleepd_next_transition_seconds",
                                "Seconds until the next planned transition (-1: none planned).",
                                value=max(0.0, upcoming.at - live.now)
                                if upcoming and math.isfinite(upcoming.at) else -1.0)
        yield from _power_families(live.power)
        freed = live.stats.gpu_memory_freed_bytes
        if freed is not None:
            yield GaugeMetricFamily("autosleepd_gpu_memory_freed_bytes",
                                    "GPU memory freed by the last sleep, as NVML saw it.",
                                    value=float(freed))


def _power_families(power: dict | None) -> Iterable:
    """The engine's GPU draw, energy per state and the estimated saving (gpu/power.py)."""
    if not power:
        return
    watts = GaugeMetricFamily("autosleepd_gpu_power_watts", "Power draw of each of the engine's "
                              "GPUs at the last reading (NVML).", labels=["gpu"])
    for uuid, value in power["gpu_watts"].items():
        watts.add_metric([uuid], value)
    yield watts
    if power["awake_idle_watts"] is not None:
        yield GaugeMetricFamily("autosleepd_gpu_awake_idle_watts", "The engine's GPUs' draw when "
                                "awake with no work, as measured.", value=power["awake_idle_watts"])
    energy = CounterMetricFamily("autosleepd_gpu_energy_watt_hours", "Energy the engine's GPUs "
                                 "used, by the engine's state.", labels=["state"])
    for state, value in power["energy_wh"].items():
        energy.add_metric([state], value)
    yield energy
    yield GaugeMetricFamily("autosleepd_energy_saved_watt_hours", "Estimated energy saved against "
                            "staying awake and idle, from measured draws (a cold start counts "
                            "against it).", value=power["saved_wh"])
