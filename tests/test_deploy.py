"""The deployment files: systemd units, compose files, Kubernetes manifests, the dashboard.

These check what can be checked without Docker, systemd or a cluster: the units with
systemd-analyze, the manifests against the Kubernetes schemas, the wiring of every file (vLLM
never exposed, the sidecar pointing at the right place and outliving vLLM's restarts, probes
that never wake the engine), and the pod's wiring run for real against the simulator. The
files under real Docker and real systemd: `make integration` (integration/).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from autosleepd.sim import expected_text

from .conftest import OneGpu, eventually, post_completion
from .test_observability import scrape


ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.two-models.yml"]
AUTOSLEEPD_ENDPOINTS = {"/autosleepd/healthz", "/autosleepd/engine-healthz"}


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units as an instance would load them, with ExecStart at the installed autosleepd."""
    binary = Path(sys.executable).parent / "autosleepd"
    text = (ROOT / "systemd/autosleepd@.service").read_text()
    (tmp_path / "autosleepd@qwen.service").write_text(
        text.replace("/opt/autosleepd/bin/autosleepd", str(binary)))
    shutil.copy(ROOT / "systemd/vllm@.service", tmp_path / "vllm@qwen.service")
    return tmp_path


@pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze is not installed")
def test_the_units_pass_systemd_analyze_verify(units: Path):
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(units / "autosleepd@qwen.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze is not installed")
def test_the_service_exposure_is_rated_ok_or_better(units: Path):
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager",
                             str(units / "autosleepd@qwen.service")],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, match.group(0)


def test_the_unit_is_a_notify_service_ordered_after_its_vllm_but_not_bound_to_it():
    """vLLM's crash or `systemctl restart vllm@qwen` must leave the sidecar up, holding work."""
    unit = (ROOT / "systemd/autosleepd@.service").read_text()
    for line in ("Type=notify", "After=network.target vllm@%i.service", "WantedBy=multi-user.target",
                 "EnvironmentFile=/etc/autosleepd/%i.env", "WatchdogSec=", "DynamicUser=yes",
                 "NoNewPrivileges=yes", "DeviceAllow=/dev/nvidiactl", "DeviceAllow=/dev/nvidia0"):
        assert line in unit
    directives = {line.split("=", 1)[0] for line in unit.splitlines() if "=" in line and line[0] != "#"}
    assert not directives & {"BindsTo", "PartOf", "Requires", "Requisite"}, "the sidecar must outlive vLLM"
    stop = float(re.search(r"^TimeoutStopSec=(\d+)s", unit, re.MULTILINE).group(1))
    assert stop > 30, "longer than the 30 s shutdown drain"
    assert "VLLM_SERVER_DEV_MODE=1" in (ROOT / "systemd/vllm@.service").read_text()
    assert "--host 127.0.0.1" in (ROOT / "systemd/vllm@.service").read_text()


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def _upstreams(sidecar: dict) -> dict[str | None, str]:
    """The engines an autosleepd service fronts, {name: URL}; one unnamed without ENGINES."""
    env = _env(sidecar)
    if "AUTOSLEEPD_ENGINES" in env:
        return dict(item.split("=", 1) for item in env["AUTOSLEEPD_ENGINES"].split(","))
    return {None: env["AUTOSLEEPD_UPSTREAM"]}


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_keeps_vllm_internal_and_points_each_sidecar_at_its_engine(name: str):
    compose = _compose(name)
    services, networks = compose["services"], compose["networks"]
    engines = {n: s for n, s in services.items() if s["image"].startswith("vllm/")}
    sidecars = {n: s for n, s in services.items()
                if {"AUTOSLEEPD_UPSTREAM", "AUTOSLEEPD_ENGINES"} & set(_env(s))}
    assert engines and sidecars
    for engine_name, engine in engines.items():
        assert "ports" not in engine, f"{engine_name} must not be published"
        assert _env(engine).get("VLLM_SERVER_DEV_MODE") == "1"
        assert all(networks[n].get("internal") for n in engine["networks"]), \
            f"{engine_name} runs dev mode, so it may sit on internal networks only"
        assert "--enable-sleep-mode" in engine["command"]
        assert "healthcheck" in engine
    pointed = []
    for sidecar_name, sidecar in sidecars.items():
        for engine_label, url in _upstreams(sidecar).items():
            upstream = urlsplit(url)
            assert upstream.hostname in engines, f"{sidecar_name} points at {upstream.hostname}"
            command = engines[upstream.hostname]["command"]
            assert command[command.index("--port") + 1] == str(upstream.port)
            assert set(engines[upstream.hostname]["networks"]) & set(sidecar["networks"])
            assert sidecar["depends_on"][upstream.hostname]
            # A broken engine is restarted: its healthcheck asks about it, by name where the
            # service fronts several.
            check = " ".join(engines[upstream.hostname]["healthcheck"]["test"])
            asked = "" if engine_label is None else f"?engine={engine_label}"
            assert f"http://{sidecar_name}:8080/autosleepd/engine-healthz{asked}" in check
            pointed.append(upstream.hostname)
        assert any(p.endswith(":8080") for p in sidecar["ports"])
        # Outlives vLLM: no shared PID namespace (vLLM's PID 1 exiting would kill it), a grace
        # period that covers the 30 s drain, the token from its env file, not interpolation.
        assert "pid" not in sidecar and "ipc" not in sidecar
        assert _seconds(sidecar["stop_grace_period"]) > 30
        # An init as PID 1 reaps what is orphaned in the container; autosleepd as PID 1 would
        # leave it <defunct> (make integration kills a worker and orphans a process to see it).
        assert sidecar.get("init") is True
        assert sidecar["env_file"] == "autosleepd.env"
        assert "AUTOSLEEPD_ADMIN_TOKEN" not in _env(sidecar)
        assert not sidecar["image"].endswith(":latest")
        devices = sidecar["deploy"]["resources"]["reservations"]["devices"]
        assert [d["capabilities"] for d in devices] == [["utility"]]   # NVML, no GPU compute
        assert "/autosleepd/healthz" in " ".join(sidecar["healthcheck"]["test"])
    assert sorted(pointed) == sorted(engines), "each engine is fronted exactly once"


def _seconds(text: str) -> float:
    return float(text[:-1]) * {"s": 1, "m": 60}[text[-1]]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_needs_no_variable_to_be_managed_from_a_new_shell(name: str):
    text = (ROOT / name).read_text()
    assert ":?" not in text, "a required variable breaks `docker compose ps/logs/down` in a new shell"
    example = (ROOT / "autosleepd.env.example").read_text()
    assert re.search(r"^AUTOSLEEPD_ADMIN_TOKEN=", example, re.MULTILINE)
    assert "autosleepd.env" in (ROOT / ".gitignore").read_text().split()


def test_two_models_share_one_gpu_behind_one_port():
    compose = _compose("docker-compose.two-models.yml")
    services = compose["services"]
    sidecars = [s for s in services.values() if "AUTOSLEEPD_ENGINES" in _env(s)]
    assert len(sidecars) == 1 and sidecars[0]["ports"] == ["8080:8080"]
    for label, url in _upstreams(sidecars[0]).items():
        command = services[urlsplit(url).hostname]["command"]
        # the engine's name is its served model name: requests route before /v1/models is read
        assert command[command.index("--served-model-name") + 1] == label
    gpus = {tuple(d["device_ids"]) for s in services.values()
            for d in s["deploy"]["resources"]["reservations"]["devices"]}
    assert gpus == {("0",)}
    from autosleepd.config import Config
    assert len(Config.from_env(_env(sidecars[0])).engines) == 2


def test_the_dockerfile_is_pinned_and_runs_as_a_user():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", text, re.MULTILINE).group(1)
    assert re.search(r":\d+\.\d+\.\d+-", base), base
    assert set(re.findall(r"^FROM (\S+)", text, re.MULTILINE)) == {"${BASE}"}
    assert re.search(r"^USER \d+", text, re.MULTILINE)
    assert "/autosleepd/healthz" in text


def _manifests() -> list[dict]:
    documents = []
    for path in sorted((ROOT / "deploy/kubernetes").glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def test_the_kubernetes_manifests_match_the_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in _manifests():
        kubernetes_validate.validate(document, "1.31", strict=True)


def test_the_pod_exposes_only_autosleepd_and_its_probes_never_wake_the_engine():
    documents = _manifests()
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    service = next(d for d in documents if d["kind"] == "Service")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    vllm, sidecar = containers["vllm"], containers["autosleepd"]
    assert "ports" not in vllm
    assert vllm["args"][vllm["args"].index("--host") + 1] == "127.0.0.1"
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    port = vllm["args"][vllm["args"].index("--port") + 1]
    assert env["AUTOSLEEPD_UPSTREAM"] == f"http://127.0.0.1:{port}"
    named = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"] and "http" in named
    for container in containers.values():
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                check = container[probe]["httpGet"]
                assert check["path"] in AUTOSLEEPD_ENDPOINTS
                assert check["port"] in ("http", named["http"])


async def test_the_dashboard_and_the_alert_rules_use_only_metrics_autosleepd_exports(
        make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, gpu=OneGpu(sim))
    await server.supervisor.order_sleep(1)
    assert (await post_completion(http, server.url))[0] == 200   # a wake and a request
    exported = {name for name, _ in await scrape(http, server)}
    dashboard = json.loads((ROOT / "deploy/grafana/autosleepd-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\bautosleepd_\w+", target["expr"])}
    assert used and used <= exported, used - exported
    rules = set(re.findall(r"\bautosleepd_\w+", (ROOT / "deploy/prometheus/autosleepd-alerts.yml").read_text()))
    assert rules <= exported, rules - exported


def _pod() -> tuple[dict, dict, dict]:
    deployment = next(d for d in _manifests() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    return pod, containers["vllm"], containers["autosleepd"]


def test_the_one_port_pod_fronts_both_engines_and_probes_each_by_name():
    from autosleepd.config import Config
    documents = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/one-port-two-models.yaml").read_text()) if d]
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    sidecar = containers.pop("autosleepd")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    config = Config.from_env({k: v for k, v in env.items()   # the directory exists in the pod only
                              if k.startswith("AUTOSLEEPD_") and v and k != "AUTOSLEEPD_COORDINATION_DIR"})
    served = {}
    for vllm in containers.values():
        args = vllm["args"]
        assert "ports" not in vllm and args[args.index("--host") + 1] == "127.0.0.1"
        served[args[args.index("--served-model-name") + 1]] = f"http://127.0.0.1:{args[args.index('--port') + 1]}"
        probe = vllm["livenessProbe"]["httpGet"]
        name = args[args.index("--served-model-name") + 1]
        assert probe == {"path": f"/autosleepd/engine-healthz?engine={name}", "port": 8080}
    assert dict(config.engines) == served
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] and env["AUTOSLEEPD_COORDINATION_DIR"] in mounts
    service = next(d for d in documents if d["kind"] == "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_sidecar_is_hardened_and_reads_nvml_without_a_gpu():
    pod, _, sidecar = _pod()
    assert pod["automountServiceAccountToken"] is False
    assert sidecar["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    images = [c["image"] for c in pod["containers"]]
    assert all(":" in image and not image.endswith(":latest") for image in images), images
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility" and env["NVIDIA_VISIBLE_DEVICES"]
    assert "nvidia.com/gpu" not in json.dumps(sidecar["resources"]), "the sidecar must not take a GPU"


async def test_in_the_pod_a_request_is_held_across_a_vllm_restart(make_sim, make_proxy, http):
    """The pod's wiring, run for real: autosleepd with the manifest's settings in front of an
    engine that the kubelet restarts. The sidecar's own probes stay green throughout (so it is
    neither restarted nor taken out of the Service), vLLM's probe does not kill a loading engine,
    and a request that arrives while vLLM is down is served by the new one."""
    from autosleepd.config import Config
    _, vllm, sidecar = _pod()
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    config = Config.from_env(env)
    assert config.wake_timeout >= 300, "a restart loads the model: hold requests for minutes"
    sim = await make_sim()
    server = await make_proxy(sim.url, wake_timeout=config.wake_timeout,
                              idle_timeout=config.idle_timeout, probe_interval=0.2)
    assert (await post_completion(http, server.url, "before"))[0] == 200
    await sim.kill()                    # the kubelet restarts the vllm container
    request = asyncio.create_task(post_completion(http, server.url, "across"))
    await eventually(lambda: server.supervisor.status().to_json()["queued"] == 1, what="the request held")
    probes = [(sidecar, "livenessProbe"), (sidecar, "readinessProbe"), (vllm, "livenessProbe")]
    for container, probe in probes:     # every probe, as the kubelet sends it, while vLLM is down
        async with http.get(server.url + container[probe]["httpGet"]["path"]) as response:
            assert response.status == 200, (container["name"], probe)
    assert not request.done()
    await sim.start()                   # the new engine is up
    status, body = await asyncio.wait_for(request, 30)
    assert status == 200 and body["choices"][0]["text"] == expected_text("across", 4)
    assert sim.stats.violations == {}


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(not PROMTOOL, reason="promtool is not installed (apt-get install prometheus)")
def test_the_alert_rules_pass_promtool_and_fire_on_what_they_name():
    rules = ROOT / "deploy/prometheus"
    for command in (["check", "rules", "autosleepd-alerts.yml"],
                    ["test", "rules", "autosleepd-alerts.test.yml"]):
        result = subprocess.run([PROMTOOL, *command], cwd=rules, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_service_monitor_selects_the_service_and_scrapes_the_metrics_path():
    monitor = yaml.safe_load((ROOT / "deploy/prometheus/servicemonitor.yaml").read_text())
    documents = _manifests()
    service = next(d for d in documents if d["kind"] == "Service")
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) buckets."""
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _wake_quantiles(seconds: float) -> tuple[float, float]:
    """p50 and p95 as Prometheus computes them from the wake histogram, after 20 wakes."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from autosleepd.metrics import Metrics
    metrics = Metrics()
    for _ in range(20):
        metrics.woke(1, "request", seconds)
    family = next(f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
                  if f.name == "autosleepd_wake_duration_seconds")
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    return _histogram_quantile(0.5, buckets), _histogram_quantile(0.95, buckets)


@pytest.mark.parametrize("seconds", [0.06, 0.64, 2.4, 13.9, 45.0, 301.0, 590.0])
def test_the_dashboard_s_wake_quantiles_resolve_real_wake_times(seconds: float):
    """From a small model's level-2 wake to a first sleep of a large one: within one bucket,
    and buckets are at most 1.5x apart."""
    for estimate in _wake_quantiles(seconds):
        assert seconds / 1.5 <= estimate <= seconds * 1.5, (seconds, estimate)


def test_wakes_of_two_seconds_read_as_two_seconds():
    p50, p95 = _wake_quantiles(2.0)
    assert round(p50, 2) == 1.88 and round(p95, 2) == 1.99   # the README's example
