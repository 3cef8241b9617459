"""The deployment files: systemd units, compose files, Kubernetes manifests, the dashboard.

Docker cannot run here and no cluster exists, so these check what can be checked offline: the
units with systemd-analyze, the manifests against the Kubernetes schemas, and the wiring of
every file (vLLM never exposed, the sidecar pointing at the right place, probes that never wake
the engine).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from .conftest import OneGpu, post_completion
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


def test_the_unit_is_a_notify_service_bound_to_its_vllm_with_a_watchdog():
    unit = (ROOT / "systemd/autosleepd@.service").read_text()
    for line in ("Type=notify", "BindsTo=vllm@%i.service", "EnvironmentFile=/etc/autosleepd/%i.env",
                 "WatchdogSec=", "DynamicUser=yes", "NoNewPrivileges=yes"):
        assert line in unit
    assert "VLLM_SERVER_DEV_MODE=1" in (ROOT / "systemd/vllm@.service").read_text()
    assert "--host 127.0.0.1" in (ROOT / "systemd/vllm@.service").read_text()


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_keeps_vllm_internal_and_points_each_sidecar_at_its_engine(name: str):
    compose = _compose(name)
    services, networks = compose["services"], compose["networks"]
    engines = {n: s for n, s in services.items() if s["image"].startswith("vllm/")}
    sidecars = {n: s for n, s in services.items() if "AUTOSLEEPD_UPSTREAM" in _env(s)}
    assert engines and len(sidecars) == len(engines)
    for engine_name, engine in engines.items():
        assert "ports" not in engine, f"{engine_name} must not be published"
        assert _env(engine).get("VLLM_SERVER_DEV_MODE") == "1"
        assert all(networks[n].get("internal") for n in engine["networks"]), \
            f"{engine_name} runs dev mode, so it may sit on internal networks only"
        assert "--enable-sleep-mode" in engine["command"]
        assert "healthcheck" in engine
    pointed = set()
    for sidecar_name, sidecar in sidecars.items():
        upstream = urlsplit(_env(sidecar)["AUTOSLEEPD_UPSTREAM"])
        assert upstream.hostname in engines, f"{sidecar_name} points at {upstream.hostname}"
        command = engines[upstream.hostname]["command"]
        assert command[command.index("--port") + 1] == str(upstream.port)
        assert set(engines[upstream.hostname]["networks"]) & set(sidecar["networks"])
        assert sidecar["depends_on"][upstream.hostname]
        assert any(p.endswith(":8080") for p in sidecar["ports"])
        assert "/autosleepd/healthz" in " ".join(sidecar["healthcheck"]["test"])
        # A broken engine is restarted: its healthcheck asks its own sidecar.
        check = " ".join(engines[upstream.hostname]["healthcheck"]["test"])
        assert f"http://{sidecar_name}:8080/autosleepd/engine-healthz" in check
        pointed.add(upstream.hostname)
    assert pointed == set(engines), "each engine has exactly one sidecar"


def test_two_models_share_one_gpu_through_a_coordination_volume():
    compose = _compose("docker-compose.two-models.yml")
    sidecars = [s for s in compose["services"].values() if "AUTOSLEEPD_UPSTREAM" in _env(s)]
    dirs = {_env(s)["AUTOSLEEPD_COORDINATION_DIR"] for s in sidecars}
    assert len(dirs) == 1
    mounts = {tuple(v.split(":")[:2]) for s in sidecars for v in s["volumes"]}
    assert mounts == {("coordination", dirs.pop())}
    gpus = {tuple(d["device_ids"]) for s in compose["services"].values()
            for d in s["deploy"]["resources"]["reservations"]["devices"]}
    assert gpus == {("0",)}
    assert len({_env(s)["AUTOSLEEPD_INSTANCE"] for s in sidecars}) == len(sidecars)


def test_the_dockerfile_is_pinned_and_runs_as_a_user():
    text = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert bases and all(re.search(r":\d+\.\d+\.\d+-", base) for base in bases), bases
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


async def test_the_dashboard_uses_only_metrics_autosleepd_exports(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, gpu=OneGpu(sim))
    await server.supervisor.order_sleep(1)
    assert (await post_completion(http, server.url))[0] == 200   # a wake and a request
    exported = {name for name, _ in await scrape(http, server)}
    dashboard = json.loads((ROOT / "deploy/grafana/autosleepd-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\bautosleepd_\w+", target["expr"])}
    assert used and used <= exported, used - exported
