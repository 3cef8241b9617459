"""The one configuration object, built and validated from the environment at start.

Every setting is an ``AUTOSLEEPD_*`` variable. A bad value raises ``ConfigError`` naming the
variable, the value and what was expected; the command line turns that into exit status 2.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .policy.ladder import Ladder
from .policy.schedule import Schedule
from .proxy.routes import CONTROL_PATHS, INFERENCE_PATHS, PASSIVE_PATHS, normalize_path

PREFIX = "AUTOSLEEPD_"
# Read outside the configuration: by ``autosleepd status|sleep|wake``.
_OTHER_VARIABLES = frozenset({PREFIX + "URL"})
# Admin tokens that are examples, not secrets.
_PLACEHOLDER_WORDS = ("changeme", "replace", "placeholder", "example", "yourtoken", "password",
                      "secret", "token")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable, the value and the rule."""

    def __init__(self, name: str, value: str | None, expected: str, shown: str | None = None):
        # value None: a secret, named but never shown; ``shown``: the value masked
        text = name if value is None else f"{name}={shown or repr(value)}"
        super().__init__(f"{text} is invalid: expected {expected}")
        self.name = name


def parse_duration(text: str) -> float:
    """``300``, ``2.5``, ``250ms``, ``30s``, ``5m``, ``1h`` -> seconds. Raises ValueError."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(text)
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(text)
    return seconds


@dataclass(frozen=True)
class Config:
    upstream: str = "http://127.0.0.1:8000"
    host: str = "0.0.0.0"
    port: int = 8080
    idle_timeout: float = 300.0          # 0 turns autosleep off
    sleep_level: int = 1                 # also the level of manual sleeps when auto
    sleep_level_auto: bool = False       # AUTOSLEEPD_SLEEP_LEVEL=auto (policy/level.py)
    wake_timeout: float = 120.0          # longest a held request waits
    max_queue: int = 1024
    admin_token: str | None = None
    log_level: str = "info"
    log_format: str = "auto"
    log_requests: bool = False
    sleep_timeout: float = 300.0         # one /sleep call (a first level-1 sleep of 32B took 45 s)
    drain_timeout: float = 30.0          # a manual sleep waits this long for in-flight work
    shutdown_timeout: float = 30.0       # in-flight work may finish this long after SIGTERM
    probe_interval: float = 30.0         # how often the engine's real state is re-read
    connect_timeout: float = 5.0         # opening a connection to the engine
    max_body_size: int = 0               # request body limit in bytes; 0: none
    keepalive_timeout: float = 75.0      # an idle client connection is closed after this (nginx's)
    header_timeout: float = 20.0         # a client has this long to send a request's headers
    max_connections: int = 4096          # client connections open at once; more get 503
    trusted_proxies: frozenset = frozenset()   # fronts whose X-Forwarded-Proto/-Host are kept
    wake_check: str = "request"          # after a wake: "request", "state" or "fingerprint"
    engine_wake_timeout: float = 600.0   # one whole wake sequence, engine-side
    upstream_api_key: str | None = field(default=None, repr=False)   # vLLM's --api-key
    event_loop: str = "auto"             # "auto" (uvloop when installed), "uvloop" or "asyncio"
    workers: int = 1                     # processes serving the data path (the owner is one)
    # The memory guard
    engine_pid: int | None = None        # the vLLM server's PID; else found from the upstream port
    gpus: frozenset[str] = frozenset()   # the engine's GPUs (indices or UUIDs); else learned
    wake_memory: int = 0                 # GPU bytes the engine holds awake, per GPU; 0: learned
    wake_memory_margin: int = 2**30      # kept free beyond what a wake maps
    weights_memory: int = 0              # host RAM a level-1 sleep takes; 0: learned
    level1_fallback: str = "level2"      # when host RAM is short: "level2" or "refuse"
    memory_poll: float = 0.25            # how often free memory is re-read while waiting for it
    restart_command: str | None = None   # runs when the engine is broken (a failed wake)
    restart_backoff: float = 10.0        # before re-running it for an engine still broken; doubles
    # The ladder's stop rung: commands that stop and start the engine's process
    stop_command: str | None = None
    start_command: str | None = None
    engine_stop_timeout: float = 120.0   # the stop command, then until the port refuses
    engine_start_timeout: float = 600.0  # the start command, then until /health answers and the check
    # Recycling (a restart while asleep and idle) against residual-memory drift; 0: off
    recycle_residue_growth: int = 2 * 2**30   # memory left asleep, grown past the first cycle's
    recycle_after_cycles: int = 0        # sleep/wake cycles since the engine started
    recycle_after: float = 0.0           # the engine's age
    coordination_dir: str | None = None  # shared by the sidecars of engines on the same GPUs
    instance: str | None = None          # this sidecar's name there; default host-port
    # Sleep policy beyond one timer
    timezone: str = "UTC"                # for keep-awake windows and the learned pre-wake
    keep_awake: Schedule | None = None   # windows in which autosleepd never sleeps the engine
    ladder: Ladder | None = None         # idle times and levels; replaces IDLE_TIMEOUT/SLEEP_LEVEL
    prewake: str = "off"                 # "learned": wake before traffic usually resumes
    prewake_lead: float = 120.0          # how long before
    state_file: str | None = None        # where what was learned survives a restart
    passive_paths: frozenset[str] = PASSIVE_PATHS
    blocked_paths: frozenset[str] = CONTROL_PATHS
    # One port for several engines: (name, URL) pairs; empty: the one engine at ``upstream``
    engines: tuple[tuple[str, str], ...] = ()
    engine_name: str | None = None       # this engine's name on its host (for_engine sets it; commands see it)
    keep_alive_max: float = 3600.0       # the longest idle window a request's header may ask for

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Config":
        return cls._read(_Reader(env), env)

    @classmethod
    def _read(cls, read: "_Reader", env: Mapping[str, str]) -> "Config":
        extra_passive = read.get("PASSIVE_PATHS", frozenset(), _paths)
        extra_blocked = read.get("BLOCKED_PATHS", frozenset(), _paths)
        config = cls(
            upstream=read.get("UPSTREAM", cls.upstream, _upstream_url),
            host=read.get("HOST", cls.host, _host),
            port=read.get("PORT", cls.port, _port),
            idle_timeout=read.get("IDLE_TIMEOUT", cls.idle_timeout, _duration),
            sleep_level=read.get("SLEEP_LEVEL", cls.sleep_level, _sleep_level),
            wake_timeout=read.get("WAKE_TIMEOUT", cls.wake_timeout, _positive_duration),
            max_queue=read.get("MAX_QUEUE", cls.max_queue, _int_at_least(0)),
            admin_token=read.get("ADMIN_TOKEN", None, _token),
            log_level=read.get("LOG_LEVEL", cls.log_level, _choice(_LOG_LEVELS)),
            log_format=read.get("LOG_FORMAT", cls.log_format, _choice(_LOG_FORMATS)),
            log_requests=read.get("LOG_REQUESTS", cls.log_requests, _bool),
            sleep_timeout=read.get("SLEEP_TIMEOUT", cls.sleep_timeout, _positive_duration),
            drain_timeout=read.get("DRAIN_TIMEOUT", cls.drain_timeout, _duration),
            shutdown_timeout=read.get("SHUTDOWN_TIMEOUT", cls.shutdown_timeout, _duration),
            probe_interval=read.get("PROBE_INTERVAL", cls.probe_interval, _positive_duration),
            connect_timeout=read.get("CONNECT_TIMEOUT", cls.connect_timeout, _positive_duration),
            max_body_size=read.get("MAX_BODY_SIZE", cls.max_body_size, _size),
            keepalive_timeout=read.get("KEEPALIVE_TIMEOUT", cls.keepalive_timeout,
                                       _positive_duration),
            header_timeout=read.get("HEADER_TIMEOUT", cls.header_timeout, _positive_duration),
            max_connections=read.get("MAX_CONNECTIONS", cls.max_connections, _int_at_least(1)),
            trusted_proxies=read.get("TRUSTED_PROXIES", cls.trusted_proxies, _networks),
            wake_check=read.get("WAKE_CHECK", cls.wake_check,
                                _choice(("request", "state", "fingerprint"))),
            engine_wake_timeout=read.get("ENGINE_WAKE_TIMEOUT", cls.engine_wake_timeout,
                                         _positive_duration),
            upstream_api_key=_api_key(read),
            event_loop=read.get("EVENT_LOOP", cls.event_loop, _event_loop),
            workers=read.get("WORKERS", cls.workers, _workers),
            engine_pid=read.get("ENGINE_PID", None, _int_at_least(1)),
            gpus=read.get("GPUS", cls.gpus, _gpu_list),
            wake_memory=read.get("WAKE_MEMORY", cls.wake_memory, _size),
            wake_memory_margin=read.get("WAKE_MEMORY_MARGIN", cls.wake_memory_margin, _size),
            weights_memory=read.get("WEIGHTS_MEMORY", cls.weights_memory, _size),
            level1_fallback=read.get("LEVEL1_FALLBACK", cls.level1_fallback,
                                     _choice(("level2", "refuse"))),
            memory_poll=read.get("MEMORY_POLL", cls.memory_poll, _positive_duration),
            restart_command=read.get("ENGINE_RESTART_COMMAND", None, _optional_text),
            restart_backoff=read.get("RESTART_BACKOFF", cls.restart_backoff, _positive_duration),
            stop_command=read.get("ENGINE_STOP_COMMAND", None, _optional_text),
            start_command=read.get("ENGINE_START_COMMAND", None, _optional_text),
            engine_stop_timeout=read.get("ENGINE_STOP_TIMEOUT", cls.engine_stop_timeout,
                                         _positive_duration),
            engine_start_timeout=read.get("ENGINE_START_TIMEOUT", cls.engine_start_timeout,
                                          _positive_duration),
            recycle_residue_growth=read.get("RECYCLE_RESIDUE_GROWTH", cls.recycle_residue_growth,
                                            _size),
            recycle_after_cycles=read.get("RECYCLE_AFTER_CYCLES", cls.recycle_after_cycles,
                                          _int_at_least(0)),
            recycle_after=read.get("RECYCLE_AFTER", cls.recycle_after, _duration),
            coordination_dir=read.get("COORDINATION_DIR", None, _absolute_dir),
            instance=read.get("INSTANCE", None, _instance_name),
            prewake=read.get("PREWAKE", cls.prewake, _choice(("off", "learned"))),
            prewake_lead=read.get("PREWAKE_LEAD", cls.prewake_lead, _duration),
            state_file=read.get("STATE_FILE", None, _absolute_file),
            engines=read.get("ENGINES", (), _engines),
            keep_alive_max=read.get("KEEP_ALIVE_MAX", cls.keep_alive_max, _at_most_a_year),
            passive_paths=(PASSIVE_PATHS | extra_passive) - extra_blocked,
            blocked_paths=CONTROL_PATHS | extra_blocked,
        )
        for forbidden, what in ((CONTROL_PATHS, "vLLM control path"),
                                (INFERENCE_PATHS, "inference path: it would reach a sleeping engine")):
            overlap = extra_passive & forbidden
            if overlap:
                raise ConfigError(PREFIX + "PASSIVE_PATHS", env[PREFIX + "PASSIVE_PATHS"],
                                  f"no {what} (found {', '.join(sorted(overlap))})")
        zone = read.get("TIMEZONE", cls.timezone, _timezone)
        schedule = read.get("KEEP_AWAKE", None, lambda raw: _schedule(raw, zone))
        ladder = read.get("LADDER", None, _ladder)
        if ladder is not None:
            clash = [n for n in ("IDLE_TIMEOUT", "SLEEP_LEVEL") if PREFIX + n in env]
            if clash:
                raise ConfigError(PREFIX + "LADDER", env[PREFIX + "LADDER"],
                                  f"either a ladder or {PREFIX}{clash[0]}, not both")
            config = replace(config, idle_timeout=ladder.first[0], sleep_level=ladder.first[1])
        if config.sleep_level == 0:
            config = replace(config, sleep_level=1, sleep_level_auto=True)
        config = replace(config, timezone=zone, keep_awake=schedule, ladder=ladder)
        _check_recycling(config, env)
        _check_engines(config, env)
        if config.engines:
            config = replace(config, upstream=config.engines[0][1])
        _check_stop_rung(config, env)
        if config.prewake == "learned" and not config.autosleep:
            raise ConfigError(PREFIX + "PREWAKE", "learned", "autosleep on (an idle timeout above 0)")
        if config.prewake == "learned" and config.workers > 1:
            # Workers admit without the owner: the learner would miss arrivals it learns from.
            raise ConfigError(PREFIX + "WORKERS", env[PREFIX + "WORKERS"],
                              "1 while AUTOSLEEPD_PREWAKE=learned (the learner must see every arrival)")
        return config

    @property
    def autosleep(self) -> bool:
        return self.idle_timeout > 0

    @property
    def engine_urls(self) -> tuple[tuple[str, str], ...]:
        """(name, URL) of every engine behind this port; one unnamed engine without ENGINES."""
        return self.engines or ((self.instance or "engine", self.upstream),)

    def for_engine(self, name: str, url: str) -> "Config":
        """One engine's configuration on a host of several: its URL, its coordination name and
        its own learned pre-wake file; every other setting is the host's."""
        if not self.engines or len(self.engines) == 1:
            return replace(self, upstream=url, engine_name=name)
        base = self.instance or local_url(self.host, self.port).split("//")[1].replace(":", "-")
        state_file = None
        if self.state_file is not None:
            stem, dot, suffix = self.state_file.rpartition(".")
            state_file = f"{stem}.{name}.{suffix}" if dot and "/" not in suffix else f"{self.state_file}.{name}"
        return replace(self, upstream=url, instance=_instance_name(f"{base}-{name}"[:64]),
                       state_file=state_file, engine_name=name)

    @property
    def recycling(self) -> bool:
        """Whether any recycle limit is on (each needs the restart command)."""
        return self.restart_command is not None and bool(
            self.recycle_residue_growth or self.recycle_after_cycles or self.recycle_after)


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each AUTOSLEEPD_* variable that no setting reads, with the closest valid name (or None)."""
    read = _Reader({})
    Config._read(read, {})   # asks for every variable, all unset
    known = {name[len(PREFIX):] for name in read.asked | _OTHER_VARIABLES}
    return [(name, next((PREFIX + close for close in
                         difflib.get_close_matches(name[len(PREFIX):], known, n=1)), None))
            for name in sorted(env) if name.startswith(PREFIX) and name[len(PREFIX):] not in known]


T = TypeVar("T")


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self._env = env
        self.asked: set[str] = set()

    def get(self, key: str, default: T, parse: Callable[[str], T], secret: bool = False) -> T:
        name = PREFIX + key
        self.asked.add(name)
        raw = self._env.get(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except _Invalid as invalid:
            raise ConfigError(name, None if secret else raw, invalid.expected, invalid.shown) from None


class _Invalid(Exception):
    def __init__(self, expected: str, shown: str | None = None):
        self.expected = expected
        self.shown = shown   # what the message shows instead of a value that may be a secret


def _duration(raw: str) -> float:
    try:
        return parse_duration(raw)
    except ValueError:
        raise _Invalid("a duration such as 300, 2.5, 250ms, 30s, 5m or 1h") from None


def _positive_duration(raw: str) -> float:
    seconds = _duration(raw)
    if seconds <= 0:
        raise _Invalid("a duration above zero, such as 250ms, 30s or 2m")
    return seconds


def _at_most_a_year(raw: str) -> float:
    seconds = _duration(raw)
    if seconds > 366 * 86400:
        raise _Invalid("a duration of at most a year, such as 1h or 24h")
    return seconds


def _ascii_int(raw: str) -> int | None:
    """A whole number in ASCII digits (int() would take '٨٠٨٠' as 8080), else None."""
    text = raw.strip()
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else None


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _ascii_int(raw)
        if value is None or value < low:
            raise _Invalid(f"a whole number of at least {low}")
        return value
    return parse


MAX_WORKERS = 64   # a typo (1000) must not start a thousand processes


def _workers(raw: str) -> int:
    value = _ascii_int(raw)
    if value is None or not 1 <= value <= MAX_WORKERS:
        raise _Invalid(f"a number of processes from 1 to {MAX_WORKERS}")
    return value


def _port(raw: str) -> int:
    value = _ascii_int(raw)
    if value is None or not 0 <= value <= 65535:
        raise _Invalid("a port number from 0 to 65535 (ASCII digits)")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise _Invalid("one of " + ", ".join(options))
        return value
    return parse


def _choice_int(*options: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if raw.strip() not in {str(o) for o in options}:
            raise _Invalid("one of " + ", ".join(map(str, options)))
        return int(raw)
    return parse


def _sleep_level(raw: str) -> int:
    """1, 2, or ``auto`` (read as 0 here, then as sleep_level_auto)."""
    if raw.strip().lower() == "auto":
        return 0
    try:
        return _choice_int(1, 2)(raw)
    except _Invalid:
        raise _Invalid("1, 2 or auto") from None


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _Invalid("true or false (1/0, yes/no, on/off)")


_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _host(raw: str) -> str:
    host = raw.strip()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not (len(host) <= 253 and _HOSTNAME_RE.fullmatch(host)):
            raise _Invalid("an IP address or a host name, such as 0.0.0.0, :: or localhost") from None
    return host


def _token(raw: str) -> str | None:
    if not raw:
        return None
    shown = f"<hidden, {len(raw)} characters>"
    if raw != raw.strip() or any(ord(c) < 33 or ord(c) > 126 for c in raw):
        raise _Invalid("a token of printable ASCII without spaces", shown)
    letters = re.sub(r"[^a-z]", "", raw.lower())
    if len(raw) < 16 or len(set(raw)) < 4 or any(word in letters for word in _PLACEHOLDER_WORDS):
        raise _Invalid("a random token of at least 16 characters, not a placeholder; make one "
                       "with: openssl rand -hex 32", shown)
    return raw


_KEY = PREFIX + "UPSTREAM_API_KEY"


def _api_key(read: _Reader) -> str | None:
    """vLLM's --api-key, from the variable or from the file it names; never shown in an error."""
    key = read.get("UPSTREAM_API_KEY", None, _token, secret=True)
    path = read.get("UPSTREAM_API_KEY_FILE", None, _optional_text)
    if path is None:
        return key
    if key is not None:
        raise ConfigError(_KEY + "_FILE", path, f"either {_KEY} or {_KEY}_FILE, not both")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read().removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(_KEY + "_FILE", path, f"a readable file holding the key ({reason})") from None
    try:
        key = _token(text)
    except _Invalid as invalid:
        raise ConfigError(_KEY + "_FILE", path, "a file holding one " + invalid.expected[2:]) from None
    if key is None:
        raise ConfigError(_KEY + "_FILE", path, "a file holding the key, not an empty one")
    return key


def _check_recycling(config: Config, env: Mapping[str, str]) -> None:
    """A recycle limit set without a restart command could never act: say so at start."""
    if config.restart_command is not None:
        return
    for key, value in (("RECYCLE_RESIDUE_GROWTH", config.recycle_residue_growth),
                       ("RECYCLE_AFTER_CYCLES", config.recycle_after_cycles),
                       ("RECYCLE_AFTER", config.recycle_after)):
        if PREFIX + key in env and value:
            raise ConfigError(PREFIX + key, env[PREFIX + key],
                              f"0, or {PREFIX}ENGINE_RESTART_COMMAND set too: recycling restarts "
                              "the engine with it")


_ENGINES = PREFIX + "ENGINES"


def _without_userinfo(text: str) -> str:
    """``text`` with every URL's ``user:password@`` masked, for messages."""
    return re.sub(r"//[^/@,\s]*@", "//***@", text)


def _engines(raw: str) -> tuple[tuple[str, str], ...]:
    try:
        return _engine_pairs(raw)
    except _Invalid as invalid:   # the value may hold a password in a URL: never shown
        raise _Invalid(_without_userinfo(invalid.expected), repr(_without_userinfo(raw))) from None


def _engine_pairs(raw: str) -> tuple[tuple[str, str], ...]:
    expected = "name=URL pairs separated by commas, such as qwen=http://127.0.0.1:8000,small=http://127.0.0.1:8001"
    pairs, seen = [], set()
    for item in (part.strip() for part in raw.split(",") if part.strip()):
        name, equals, url = item.partition("=")
        name = name.strip()
        if not equals:
            raise _Invalid(f"{expected} ({item!r} has no '=')")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}", name):
            raise _Invalid(f"{expected} (engine name {name!r}: letters, digits, '.', '_', '-', at most 48)")
        if name in seen:
            raise _Invalid(f"{expected} (engine name {name!r} is given twice)")
        try:
            url = _upstream_url(url)
        except _Invalid as invalid:
            raise _Invalid(f"{expected} (the URL of {name!r}: {invalid.expected})") from None
        seen.add(name)
        pairs.append((name, url))
    if not pairs:
        raise _Invalid(expected)
    return tuple(pairs)


def _check_engines(config: Config, env: Mapping[str, str]) -> None:
    """Settings that name one engine cannot be shared by several."""
    if not config.engines:
        return
    for key in ("UPSTREAM", "ENGINE_PID") if len(config.engines) > 1 else ("UPSTREAM",):
        if PREFIX + key in env:
            raise ConfigError(_ENGINES, env[_ENGINES], f"{_ENGINES} or {PREFIX}{key}, not both "
                              f"({PREFIX}{key} names one engine)", repr(_without_userinfo(env[_ENGINES])))
    urls = [url for _, url in config.engines]
    if len(set(urls)) != len(urls):
        raise ConfigError(_ENGINES, env[_ENGINES], "one URL per engine (two names share one)",
                          repr(_without_userinfo(env[_ENGINES])))


def _check_stop_rung(config: Config, env: Mapping[str, str]) -> None:
    """A stop rung needs both commands; a Kubernetes sidecar given none cannot stop its engine."""
    if config.ladder is None or config.ladder.stop_after is None:
        return
    missing = [PREFIX + name for name, value in (("ENGINE_STOP_COMMAND", config.stop_command),
                                                 ("ENGINE_START_COMMAND", config.start_command))
               if value is None]
    if not missing:
        return
    if "KUBERNETES_SERVICE_HOST" in env and len(missing) == 2:
        raise ConfigError(PREFIX + "LADDER", env[PREFIX + "LADDER"],
                          "no 'stop' rung here: autosleepd runs in a Kubernetes pod "
                          "(KUBERNETES_SERVICE_HOST is set) and has no command to stop and start "
                          "its engine; a sidecar cannot stop the container beside it. End the "
                          "ladder with a sleep rung (5m:1,2h:2), or set "
                          f"{PREFIX}ENGINE_STOP_COMMAND and {PREFIX}ENGINE_START_COMMAND")
    raise ConfigError(PREFIX + "LADDER", env[PREFIX + "LADDER"],
                      f"a 'stop' rung only with {' and '.join(missing)} set (the commands that "
                      "stop and start the engine's process, such as 'systemctl stop vllm@NAME')")


def _event_loop(raw: str) -> str:
    value = _choice(("auto", "uvloop", "asyncio"))(raw)
    if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise _Invalid("auto or asyncio: uvloop is not installed (pip install uvloop)")
    return value


def _timezone(raw: str) -> str:
    try:
        ZoneInfo(raw.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise _Invalid("an IANA time zone such as UTC, Europe/Paris or America/New_York") from None
    return raw.strip()


def _schedule(raw: str, zone: str) -> Schedule:
    try:
        return Schedule.parse(raw, zone)
    except ValueError as error:
        raise _Invalid(f"windows such as 'Mon-Fri 08:00-19:00, Sat 10:00-14:00' ({error})") from None


def _ladder(raw: str) -> Ladder:
    try:
        return Ladder.parse(raw, parse_duration)
    except ValueError as error:
        raise _Invalid(f"rungs such as '5m:1,2h:2' or '5m:1,2h:2,12h:stop' ({error})") from None


def _absolute_file(raw: str) -> str:
    if not raw.startswith("/") or raw.endswith("/"):
        raise _Invalid("an absolute file path such as /var/lib/autosleepd/qwen.json")
    return raw


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _gpu_list(raw: str) -> frozenset[str]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not all(item.isdigit() or item.startswith(("GPU-", "MIG-")) for item in items):
        raise _Invalid("a comma-separated list of GPU indices or UUIDs (0,1 or GPU-...)")
    return frozenset(items)


def _absolute_dir(raw: str) -> str:
    if not raw.startswith("/"):
        raise _Invalid("an absolute directory path such as /run/autosleepd")
    path = raw.rstrip("/") or "/"
    existing = path
    while not os.path.exists(existing):   # it is made at start: its nearest ancestor must allow it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise _Invalid(f"a directory autosleepd can write to ({existing} is not writable by "
                       f"uid {os.getuid()})")
    return path


def _instance_name(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", raw):
        raise _Invalid("a name of letters, digits, '.', '_' and '-' (at most 64)")
    return raw


def _upstream_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    expected = "an http:// or https:// URL such as http://127.0.0.1:8000"
    try:
        parts = urlsplit(url)
        _ = parts.port   # reading it raises on a malformed port
    except ValueError:   # also a malformed IPv6 address, such as http://[::1
        raise _Invalid(expected) from None
    if "@" in parts.netloc:
        raise _Invalid("a URL without user:password@ (the engine's API key goes in "
                       "AUTOSLEEPD_UPSTREAM_API_KEY)",
                       repr(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()))
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise _Invalid(expected)
    return url


def _networks(raw: str) -> frozenset:
    try:
        return frozenset(ipaddress.ip_network(item.strip(), strict=False)
                         for item in raw.split(",") if item.strip())
    except ValueError:
        raise _Invalid("comma-separated addresses or networks, such as 10.0.0.0/8,192.0.2.7") from None


def _paths(raw: str) -> frozenset[str]:
    paths = [p.strip() for p in raw.split(",") if p.strip()]
    if not all(p.startswith("/") and " " not in p for p in paths):
        raise _Invalid("a comma-separated list of paths that start with /")
    return frozenset(normalize_path(p) for p in paths)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(|b|kib|mib|gib|kb|mb|gb)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``1048576``, ``512KiB``, ``20MiB``, ``80GiB``, ``1GB`` -> bytes. Raises ValueError."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _size(raw: str) -> int:
    try:
        return parse_size(raw)
    except ValueError:
        raise _Invalid("a size in bytes, or with a unit such as 512KiB, 20MiB, 1GiB") from None


def local_url(host: str, port: int) -> str:
    """Where a client on this host reaches an instance listening on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
