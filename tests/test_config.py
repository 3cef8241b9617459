"""Configuration from the environment: the documented defaults, units, and strict errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from autosleepd.config import Config, ConfigError, parse_duration, parse_size


def test_defaults_are_the_documented_ones():
    config = Config.from_env({})
    assert config.upstream == "http://127.0.0.1:8000"
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert config.idle_timeout == 300 and config.sleep_level == 1
    assert config.wake_timeout == 120 and config.max_queue == 1024
    assert config.admin_token is None and config.autosleep
    assert (config.log_level, config.log_format) == ("info", "auto")


@pytest.mark.parametrize("text, seconds", [("300", 300), ("2.5", 2.5), ("250ms", 0.25),
                                           ("30s", 30), ("5m", 300), ("1h", 3600), ("0", 0)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, size", [("1048576", 2**20), ("512KiB", 512 * 2**10),
                                        ("80GiB", 80 * 2**30), ("1GB", 10**9)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_everything_can_be_set():
    config = Config.from_env({
        "AUTOSLEEPD_UPSTREAM": "http://vllm:8000/", "AUTOSLEEPD_HOST": "127.0.0.1",
        "AUTOSLEEPD_PORT": "9000", "AUTOSLEEPD_IDLE_TIMEOUT": "0", "AUTOSLEEPD_SLEEP_LEVEL": "2",
        "AUTOSLEEPD_WAKE_TIMEOUT": "30s", "AUTOSLEEPD_MAX_QUEUE": "5",
        "AUTOSLEEPD_ADMIN_TOKEN": "9f86d081884c7d659a2feaa0c55ad015", "AUTOSLEEPD_LOG_LEVEL": "DEBUG",
        "AUTOSLEEPD_LOG_FORMAT": "json", "AUTOSLEEPD_LOG_REQUESTS": "yes",
        "AUTOSLEEPD_PASSIVE_PATHS": "/tokenize, /detokenize", "AUTOSLEEPD_BLOCKED_PATHS": "/v1/embeddings",
        "AUTOSLEEPD_MAX_BODY_SIZE": "10MiB",
    })
    assert config.upstream == "http://vllm:8000" and config.port == 9000
    assert not config.autosleep and config.sleep_level == 2 and config.wake_timeout == 30
    assert config.log_level == "debug" and config.log_requests
    assert {"/tokenize", "/detokenize", "/health"} <= config.passive_paths
    assert "/v1/embeddings" in config.blocked_paths and "/sleep" in config.blocked_paths
    assert config.max_body_size == 10 * 2**20


@pytest.mark.parametrize("name, value", [
    ("AUTOSLEEPD_IDLE_TIMEOUT", "5 minutes"), ("AUTOSLEEPD_IDLE_TIMEOUT", "-1"),
    ("AUTOSLEEPD_WAKE_TIMEOUT", "0"), ("AUTOSLEEPD_WAKE_TIMEOUT", "inf"),
    ("AUTOSLEEPD_SLEEP_LEVEL", "3"), ("AUTOSLEEPD_SLEEP_LEVEL", "one"),
    ("AUTOSLEEPD_PORT", "80800"), ("AUTOSLEEPD_PORT", "http"),
    ("AUTOSLEEPD_MAX_QUEUE", "-5"), ("AUTOSLEEPD_MAX_QUEUE", "1e3"),
    ("AUTOSLEEPD_WORKERS", "0"), ("AUTOSLEEPD_WORKERS", "two"), ("AUTOSLEEPD_WORKERS", "1000"),
    ("AUTOSLEEPD_UPSTREAM", "localhost:8000"), ("AUTOSLEEPD_UPSTREAM", "ftp://x"),
    ("AUTOSLEEPD_UPSTREAM", "http://host:port"), ("AUTOSLEEPD_LOG_LEVEL", "loud"),
    ("AUTOSLEEPD_LOG_FORMAT", "xml"), ("AUTOSLEEPD_LOG_REQUESTS", "maybe"),
    ("AUTOSLEEPD_PASSIVE_PATHS", "health"),
    ("AUTOSLEEPD_PASSIVE_PATHS", "/sleep"), ("AUTOSLEEPD_MAX_BODY_SIZE", "lots"),
    ("AUTOSLEEPD_PASSIVE_PATHS", "/tokenize,/v1/completions"),
    ("AUTOSLEEPD_PASSIVE_PATHS", "/v1/embeddings/"), ("AUTOSLEEPD_MAX_CONNECTIONS", "0"),
    ("AUTOSLEEPD_TRUSTED_PROXIES", "10.0.0.0/33"), ("AUTOSLEEPD_KEEPALIVE_TIMEOUT", "0"),
])
def test_a_bad_value_names_the_variable_and_the_value(name, value):
    with pytest.raises(ConfigError) as error:
        Config.from_env({name: value})
    assert error.value.name == name
    assert name in str(error.value) and repr(value) in str(error.value)
    assert "expected" in str(error.value)


@pytest.mark.parametrize("name, value", [("AUTOSLEEPD_IDLE_TIMEOUT", "soon"),
                                         ("AUTOSLEEPD_SLEEP_LEVEL", "7"),
                                         ("AUTOSLEEPD_KEEP_AWAKE", "Mon-Fri 9 to 5"),
                                         ("AUTOSLEEPD_LADDER", "2h:1,5m:2"),
                                         ("AUTOSLEEPD_UPSTREAM", "http://[::1"),
                                         ("AUTOSLEEPD_HOST", "not a host!"),
                                         ("AUTOSLEEPD_PORT", "\u0668\u0660\u0668\u0660"),
                                         ("AUTOSLEEPD_COORDINATION_DIR", "/etc/hostname/shared")])
def test_autosleepd_exits_2_with_one_line_naming_the_variable_before_listening(name, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSLEEPD_")}
    env.update({"AUTOSLEEPD_PORT": "1", name: value})   # port 1: listening would fail differently
    result = subprocess.run([sys.executable, "-m", "autosleepd"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and repr(value) in lines[0], result.stderr
    assert result.stdout == ""


# ----- engine truth: the engine's API key, the engine-side wake deadline, recycling ------------

SECRET = "sk-upstream-5be1d0"


def test_the_engine_key_is_read_from_the_variable_and_never_shown_in_a_repr():
    config = Config.from_env({"AUTOSLEEPD_UPSTREAM_API_KEY": SECRET})
    assert config.upstream_api_key == SECRET
    assert SECRET not in repr(config)
    assert Config.from_env({}).upstream_api_key is None


def test_the_engine_key_is_read_from_a_mounted_file_without_its_trailing_newline(tmp_path):
    path = tmp_path / "key"
    path.write_text(SECRET + "\n")
    config = Config.from_env({"AUTOSLEEPD_UPSTREAM_API_KEY_FILE": str(path)})
    assert config.upstream_api_key == SECRET


@pytest.mark.parametrize("case", ["both", "missing", "empty", "spaces", "bad_inline"])
def test_a_bad_engine_key_names_its_variable_and_never_shows_the_key(tmp_path, case):
    path = tmp_path / "key"
    path.write_text({"both": SECRET, "empty": "\n", "spaces": f"{SECRET} {SECRET}\n"}.get(case, ""))
    env = {"both": {"AUTOSLEEPD_UPSTREAM_API_KEY": SECRET,
                    "AUTOSLEEPD_UPSTREAM_API_KEY_FILE": str(path)},
           "missing": {"AUTOSLEEPD_UPSTREAM_API_KEY_FILE": str(tmp_path / "absent")},
           "empty": {"AUTOSLEEPD_UPSTREAM_API_KEY_FILE": str(path)},
           "spaces": {"AUTOSLEEPD_UPSTREAM_API_KEY_FILE": str(path)},
           "bad_inline": {"AUTOSLEEPD_UPSTREAM_API_KEY": f"{SECRET} x"}}[case]
    with pytest.raises(ConfigError) as error:
        Config.from_env(env)
    expected = "AUTOSLEEPD_UPSTREAM_API_KEY" + ("" if case == "bad_inline" else "_FILE")
    assert error.value.name == expected and expected in str(error.value)
    assert SECRET not in str(error.value)


def test_an_unreadable_key_file_exits_2_with_one_line_that_shows_no_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSLEEPD_")}
    env.update({"AUTOSLEEPD_UPSTREAM_API_KEY": SECRET, "AUTOSLEEPD_PORT": "1",
                "AUTOSLEEPD_UPSTREAM_API_KEY_FILE": str(tmp_path / "absent")})
    result = subprocess.run([sys.executable, "-m", "autosleepd"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "AUTOSLEEPD_UPSTREAM_API_KEY_FILE" in lines[0], result.stderr
    assert SECRET not in result.stderr


def test_the_engine_side_wake_deadline_is_its_own_setting():
    assert Config.from_env({}).engine_wake_timeout == 600
    config = Config.from_env({"AUTOSLEEPD_ENGINE_WAKE_TIMEOUT": "15m", "AUTOSLEEPD_WAKE_TIMEOUT": "1s"})
    assert (config.engine_wake_timeout, config.wake_timeout) == (900, 1)
    with pytest.raises(ConfigError) as error:
        Config.from_env({"AUTOSLEEPD_ENGINE_WAKE_TIMEOUT": "0"})
    assert error.value.name == "AUTOSLEEPD_ENGINE_WAKE_TIMEOUT"


def test_the_wake_check_can_be_a_fingerprint():
    assert Config.from_env({"AUTOSLEEPD_WAKE_CHECK": "fingerprint"}).wake_check == "fingerprint"
    with pytest.raises(ConfigError) as error:
        Config.from_env({"AUTOSLEEPD_WAKE_CHECK": "tokens"})
    assert "fingerprint" in str(error.value)


def test_recycle_limits_are_read_and_need_the_restart_command():
    config = Config.from_env({})
    assert (config.recycle_residue_growth, config.recycle_after_cycles, config.recycle_after) == (2 * 2**30, 0, 0)
    assert not config.recycling   # the default residue limit acts only with a restart command
    config = Config.from_env({"AUTOSLEEPD_ENGINE_RESTART_COMMAND": "systemctl restart vllm",
                              "AUTOSLEEPD_RECYCLE_RESIDUE_GROWTH": "512MiB",
                              "AUTOSLEEPD_RECYCLE_AFTER_CYCLES": "500",
                              "AUTOSLEEPD_RECYCLE_AFTER": "24h"})
    assert (config.recycle_residue_growth, config.recycle_after_cycles, config.recycle_after) == (
        512 * 2**20, 500, 86400)
    assert config.recycling
    assert not Config.from_env({"AUTOSLEEPD_RECYCLE_RESIDUE_GROWTH": "0"}).recycling


@pytest.mark.parametrize("name, value", [("AUTOSLEEPD_RECYCLE_RESIDUE_GROWTH", "1GiB"),
                                         ("AUTOSLEEPD_RECYCLE_AFTER_CYCLES", "100"),
                                         ("AUTOSLEEPD_RECYCLE_AFTER", "12h")])
def test_a_recycle_limit_without_a_restart_command_is_refused(name, value):
    with pytest.raises(ConfigError) as error:
        Config.from_env({name: value})
    assert error.value.name == name and "AUTOSLEEPD_ENGINE_RESTART_COMMAND" in str(error.value)


@pytest.mark.parametrize("name, value", [("AUTOSLEEPD_RECYCLE_RESIDUE_GROWTH", "lots"),
                                         ("AUTOSLEEPD_RECYCLE_AFTER_CYCLES", "-1"),
                                         ("AUTOSLEEPD_RECYCLE_AFTER", "a day")])
def test_a_malformed_recycle_limit_names_the_variable(name, value):
    with pytest.raises(ConfigError) as error:
        Config.from_env({name: value, "AUTOSLEEPD_ENGINE_RESTART_COMMAND": "true"})
    assert error.value.name == name and repr(value) in str(error.value)


@pytest.mark.parametrize("name, value, secret, hint", [
    ("AUTOSLEEPD_ADMIN_TOKEN", "change-me", "change-me", "openssl rand -hex 32"),
    ("AUTOSLEEPD_ADMIN_TOKEN", "tooShort12345", "tooShort12345", "openssl rand -hex 32"),
    ("AUTOSLEEPD_ADMIN_TOKEN", "REPLACE-with-openssl-rand-hex-32", "REPLACE", "openssl rand -hex 32"),
    ("AUTOSLEEPD_UPSTREAM", "http://user:hunter2@vllm:8000", "hunter2", "AUTOSLEEPD_UPSTREAM_API_KEY"),
])
def test_secrets_and_placeholders_are_refused_without_being_echoed(name, value, secret, hint):
    with pytest.raises(ConfigError) as error:
        Config.from_env({name: value})
    assert error.value.name == name and hint in str(error.value)
    assert secret not in str(error.value)


def test_a_random_admin_token_and_trusted_fronts_are_accepted():
    config = Config.from_env({"AUTOSLEEPD_ADMIN_TOKEN": "3f1c9a7be0d24c65a8f0e7b19d2c4a56",
                              "AUTOSLEEPD_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7, ::1",
                              "AUTOSLEEPD_PORT": " 8081 "})
    assert config.admin_token == "3f1c9a7be0d24c65a8f0e7b19d2c4a56" and config.port == 8081
    assert len(config.trusted_proxies) == 3


def test_unknown_variables_are_found_with_their_closest_name():
    from autosleepd.config import unknown_variables
    env = {"AUTOSLEEPD_IDLE_TIMOUT": "10s", "AUTOSLEEPD_NOTHING_LIKE_IT": "1",
           "AUTOSLEEPD_PORT": "1", "AUTOSLEEPD_URL": "http://x", "PATH": "/bin"}
    assert unknown_variables(env) == [("AUTOSLEEPD_IDLE_TIMOUT", "AUTOSLEEPD_IDLE_TIMEOUT"),
                                      ("AUTOSLEEPD_NOTHING_LIKE_IT", None)]


def test_workers_are_refused_beside_the_learned_prewake_which_must_see_every_arrival():
    assert Config.from_env({"AUTOSLEEPD_WORKERS": "4"}).workers == 4
    with pytest.raises(ConfigError, match="AUTOSLEEPD_WORKERS='2' is invalid: expected 1 while "
                                          "AUTOSLEEPD_PREWAKE=learned"):
        Config.from_env({"AUTOSLEEPD_WORKERS": "2", "AUTOSLEEPD_PREWAKE": "learned"})

