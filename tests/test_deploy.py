"""Deployment checks: rendered Kubernetes manifests, KServe specs, Dockerfiles, TorchServe configs, and the
in-pod token probe (against a loopback stand-in for TorchServe). The front (nginx) itself is tested against a
real TorchServe in tests/test_nginx.py and tests/test_nginx_drain.py.

Needs kubectl (with kustomize), kubernetes-validate and hadolint (the latter two from the `test` extra).
A missing tool fails the test with a message; nothing is skipped silently.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "kubernetes"
KSERVE_FILES = sorted((DEPLOY / "kserve").glob("inferenceservice*.yaml"))

import config_check  # noqa: E402 - deploy/docker is on pytest's pythonpath (pyproject.toml)
import deploy_check  # noqa: E402  (make deploy-check: the same render / validate / lint functions)
import deploy_render  # noqa: E402  (make deploy-render)
import front  # noqa: E402
import probe  # noqa: E402
import ts_tokens  # noqa: E402

OVERLAYS = deploy_check.OVERLAYS
DOCKERFILES = deploy_check.DOCKERFILES


def _tool(name: str) -> str:
    """Path of a CLI tool (see deploy_check.find_tool); a missing one fails the test with the reason."""
    try:
        return deploy_check.find_tool(name)
    except deploy_check.ToolMissing as error:
        pytest.fail(str(error))


def assert_secure_config(props: dict[str, str], where: str) -> None:
    """The shared check applied to every TorchServe config we ship or run: token auth on, model API off."""
    findings = config_check.check_properties(props)
    assert findings == [], f"{where}: {findings}"
    assert props.get("disable_token_authorization", "false").lower() == "false", where
    assert props.get("enable_model_api", "false").lower() == "false", where


# ---------------------------------------------------------------------------------------------- kustomize

@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, str, list[dict]]:
    _tool("kubectl")
    text = deploy_check.render_overlay(request.param)
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert docs, "overlay rendered nothing"
    return request.param, text, docs


def _one(docs: list[dict], kind: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def _pod_spec(docs: list[dict]) -> dict:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]


def test_overlay_validates_against_kubernetes_1_30(rendered):
    name, text, docs = rendered
    _tool("kubernetes-validate")
    passed, output = deploy_check.validate_manifest(text, "1.30.0")
    assert passed, output
    builtin = [d for d in docs if d["kind"] not in ("ServiceMonitor", "PrometheusRule")]  # CRDs: no schema
    # Every built-in object was checked against a schema (not skipped); only the CRDs may be skipped.
    assert output.count("passed for resource") == len(builtin), output
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds


def test_every_container_has_three_probes_and_locked_down_security_context(rendered):
    _, _, docs = rendered
    pod = _pod_spec(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod.get("automountServiceAccountToken") is False
    names = {c["name"] for c in pod["containers"]}
    assert names == {"torchserve", "front"}
    for container in pod["containers"]:
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe_kind in container, f"{container['name']} lacks {probe_kind}"
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]


def test_torchserve_probes_authenticate_inside_the_container(rendered):
    """/ping needs the inference token: the TorchServe probes must be exec probes running probe.py."""
    _, _, docs = rendered
    torchserve = next(c for c in _pod_spec(docs)["containers"] if c["name"] == "torchserve")
    modes = {}
    for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = torchserve[probe_kind]["exec"]["command"]
        assert command[1] == "/opt/torchserve-cam/deploy/probe.py", command
        modes[probe_kind] = command[2]
    assert modes == {"startupProbe": "startup", "readinessProbe": "ready", "livenessProbe": "live"}


def test_writable_paths_are_emptydirs_and_key_file_is_shared(rendered):
    _, _, docs = rendered
    pod = _pod_spec(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {c["name"]: {m["mountPath"]: m for m in c["volumeMounts"]} for c in pod["containers"]}
    for path in ("/home/model-server/run", "/tmp"):
        volume = volumes[mounts["torchserve"][path]["name"]]
        assert "emptyDir" in volume, path
    # The front reads the same key file (and writes the rotation lock and reads the drain and audit markers there).
    assert mounts["front"]["/home/model-server/run"]["name"] == mounts["torchserve"]["/home/model-server/run"]["name"]
    # Its nginx config, temp files and readiness files: a writable emptyDir of its own, where GATE_STATE_DIR is.
    front_container = next(c for c in pod["containers"] if c["name"] == "front")
    state = {e["name"]: e["value"] for e in front_container["env"]}["GATE_STATE_DIR"]
    assert state.startswith("/tmp/") and "emptyDir" in volumes[mounts["front"]["/tmp"]["name"]]
    assert front_container["command"] == ["python", "/opt/torchserve-cam/deploy/front.py", "run"]
    secret = volumes[mounts["front"]["/var/run/secrets/torchserve-cam"]["name"]]["secret"]
    assert secret["secretName"] == "torchserve-cam-client-tokens"
    assert secret["defaultMode"] & 0o040, "fsGroup must be able to read the client token file"
    # No Secret with token material is committed to the manifests.
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_images_pinned_never_latest(rendered):
    name, _, docs = rendered
    expected_suffix = "-gpu" if name.startswith("gpu") else "-cpu"
    for container in _pod_spec(docs)["containers"]:
        image = container["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" in repo, image
        assert tag and tag != "latest" and "latest" not in image, image
        assert tag.endswith(expected_suffix), image


def test_gpu_resources_only_in_gpu_overlays(rendered):
    name, _, docs = rendered
    pod = _pod_spec(docs)
    torchserve = next(c for c in pod["containers"] if c["name"] == "torchserve")
    if name.startswith("gpu"):
        assert torchserve["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert torchserve["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(pod)


def test_hpa_is_autoscaling_v2_and_targets_the_deployment(rendered):
    name, _, docs = rendered
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": _one(docs, "Deployment")["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    metric = hpa["spec"]["metrics"][0]
    if name == "gpu-prometheus":
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == "ts_queue_latency_microseconds_per_second"
    else:
        assert metric == {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": 70}}}


def test_service_pdb_and_networkpolicy_select_the_pods(rendered):
    _, _, docs = rendered
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    service = _one(docs, "Service")
    assert selects(service["spec"]["selector"])
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    assert 8080 not in [p.get("port") for p in service["spec"]["ports"]], "TorchServe's own port is not exposed"
    assert selects(_one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    netpol = _one(docs, "NetworkPolicy")
    assert selects(netpol["spec"]["podSelector"]["matchLabels"])
    assert set(netpol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in netpol["spec"]["ingress"]}
    assert set(rules) == {8090, 8082}
    # Only the namespace's gateway pods (no namespaceSelector = this namespace) reach the front (nginx).
    assert rules[8090] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}]


def test_configmap_holds_the_container_config(rendered):
    _, _, docs = rendered
    configmap = _one([d for d in docs if "config.properties" in d.get("data", {})], "ConfigMap")  # not the dashboard's
    props = config_check.parse_properties(configmap["data"]["config.properties"])
    assert_secure_config(props, "ConfigMap config.properties")
    assert props == config_check.parse_properties((DOCKER / "config.properties").read_text())
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    mounted = {v["configMap"]["name"] for v in _pod_spec(docs)["volumes"] if "configMap" in v}
    assert mounted == {configmap["metadata"]["name"]}


def test_servicemonitor_fields(rendered):
    """The validator skips CRDs, so the ServiceMonitor is checked here."""
    name, _, docs = rendered
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    if name != "gpu-prometheus":
        assert monitors == [], "the CRD-dependent ServiceMonitor is opt-in"
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "torchserve-cam"
    service = _one(docs, "Service")
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s", "scheme": "http"}]


def test_audit_postgres_component_switches_the_sink_with_the_dsn_from_a_secret(rendered):
    """components/audit-postgres (in the cpu-audit-postgres overlay): the torchserve container names the sink
    the handler reads and takes the DSN from a Secret reference (never inlined, no Secret rendered); the
    NetworkPolicy keeps DNS and adds egress to PostgreSQL's port. The other overlays have none of it."""
    from handlers.audit.auditor import SINK_VARIABLE
    from handlers.config import AUDIT_SINKS

    name, text, docs = rendered
    containers = {c["name"]: {e["name"]: e for e in c.get("env", [])} for c in _pod_spec(docs)["containers"]}
    egress = _one(docs, "NetworkPolicy")["spec"]["egress"]
    ports = sorted((p["protocol"], p["port"]) for rule in egress for p in rule["ports"])
    assert "Secret" not in {d["kind"] for d in docs}
    if name != "cpu-audit-postgres":
        assert not {SINK_VARIABLE, "CAM_AUDIT_DSN"} & set().union(*containers.values()), name
        assert ports == [("TCP", 53), ("UDP", 53)]
        return
    env = containers["torchserve"]
    assert env[SINK_VARIABLE] == {"name": SINK_VARIABLE, "value": "postgres"} and "postgres" in AUDIT_SINKS
    assert env["CAM_AUDIT_DSN"] == {"name": "CAM_AUDIT_DSN", "valueFrom": {"secretKeyRef": {
        "name": "torchserve-cam-audit-postgres", "key": "dsn"}}}  # fmt: skip
    assert {"TS_CONFIG", "TS_RUN_DIR", "TS_KEY_FILE"} <= set(env)  # the base's variables are kept
    assert not {SINK_VARIABLE, "CAM_AUDIT_DSN"} & set(containers["front"])
    assert ports == [("TCP", 53), ("TCP", 5432), ("UDP", 53)]
    (database,) = [rule for rule in egress if rule["ports"] == [{"protocol": "TCP", "port": 5432}]]
    assert database["to"] and all(peer.get("podSelector") or peer.get("ipBlock") for peer in database["to"])
    assert "postgresql://" not in text and "password" not in text.lower()


# ---------------------------------------------------------------------------------------------- KServe

@pytest.mark.parametrize("path", KSERVE_FILES, ids=lambda p: p.name)
def test_kserve_inferenceservice_fields(path):
    isvc = yaml.safe_load(path.read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] == "v1"
    assert model["args"] == ["/opt/torchserve-cam/deploy/start.sh"]
    assert model["command"] == ["/usr/bin/tini", "--"]  # not -g: SIGTERM reaches start.sh only, which drains
    env = {e["name"]: e["value"] for e in model["env"]}
    assert env["TS_CONFIG"] == "/mnt/models/config/config.properties"
    (gate,) = predictor["containers"]
    assert gate["name"] == "transformer-container"
    assert gate["command"] == ["python", "/opt/torchserve-cam/deploy/front.py", "run"]
    gate_env = {e["name"]: e["value"] for e in gate["env"]}
    assert gate_env["GATE_LISTEN"] == "0.0.0.0:8080"
    # The front forwards to the port TorchServe listens on according to the KServe config.
    kserve_props = config_check.parse_properties((DEPLOY / "kserve" / "config" / "config.properties").read_text())
    assert gate_env["TS_INFERENCE_URL"] == env["TS_INFERENCE_URL"] == kserve_props["inference_address"].replace("0.0.0.0", "127.0.0.1")
    assert predictor["securityContext"]["runAsNonRoot"] is True
    for container in (model, gate):
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        tag = container["image"].rpartition(":")[2]
        assert tag and "latest" not in container["image"]
    assert model["livenessProbe"]["exec"]["command"][1:] == ["/opt/torchserve-cam/deploy/probe.py", "live"]
    gpu = "gpu" in path.name
    assert (model["resources"]["limits"].get("nvidia.com/gpu") == 1) is gpu
    assert model["image"].endswith("-gpu" if gpu else "-cpu") and gate["image"] == model["image"]
    if gpu:
        assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_kserve_config_routes_v1_through_torchserve():
    props = config_check.parse_properties((DEPLOY / "kserve" / "config" / "config.properties").read_text())
    assert_secure_config(props, "deploy/kserve/config/config.properties")
    assert "service_envelope" not in props  # the handler reads v1/v2 per request (handlers.serving.protocols)
    assert props["model_store"] == "/mnt/models/model-store"
    routes = [re.compile(route) for route in front.ROUTES]
    for path in ("/v1/models/efficientnet_lite0:predict", "/v1/models/efficientnet_lite0:explain",
                 "/v2/models/efficientnet_lite0/infer", "/v2/models/efficientnet_lite0/explain"):
        assert any(route.match(path) for route in routes), path


# ---------------------------------------------------------------------------------------------- Docker

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile):
    _tool("hadolint")
    code, findings = deploy_check.hadolint(dockerfile)
    assert findings == [], findings
    assert code == 0


def test_deploy_check_reports_a_broken_manifest():
    """What make deploy-check relies on fails on a bad object (an unknown field under --strict)."""
    _tool("kubernetes-validate")
    bad = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 80}], colour: blue}\n"
    passed, output = deploy_check.validate_manifest(bad)
    assert not passed and "colour" in output, output


def test_deploy_render_sets_the_image_everywhere_and_the_result_validates(tmp_path):
    """make deploy-render REGISTRY=...: every container of every overlay and KServe spec names the given
    registry and version (flavour kept), the committed files are untouched, and deploy_check passes it."""
    _tool("kubectl")
    committed = {p: p.read_text() for p in [*KSERVE_FILES, *sorted(K8S.rglob("*.yaml"))]}
    done = subprocess.run([sys.executable, str(DEPLOY / "deploy_render.py"), "--registry", "ghcr.io/acme/ml/",
                           "--version", "9.8.7", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for overlay in OVERLAYS:
        flavour = "gpu" if overlay.startswith("gpu") else "cpu"
        for source in (tmp_path / "kubernetes" / f"{overlay}.yaml", tmp_path / "kustomize" / overlay):
            text = source.read_text() if source.is_file() else deploy_check.render_overlay(source)
            docs = [d for d in yaml.safe_load_all(text) if d]
            images = {c["image"] for c in _pod_spec(docs)["containers"]}
            assert images == {f"ghcr.io/acme/ml/torchserve-cam:9.8.7-{flavour}"}, (overlay, images)
    for spec in KSERVE_FILES:
        rendered_spec = (tmp_path / "kserve" / spec.name).read_text()
        predictor = yaml.safe_load(rendered_spec)["spec"]["predictor"]
        flavour = "gpu" if "gpu" in spec.name else "cpu"
        images = {predictor["model"]["image"], *(c["image"] for c in predictor["containers"])}
        assert images == {f"ghcr.io/acme/ml/torchserve-cam:9.8.7-{flavour}"}, images
        assert rendered_spec.count("\n#") == spec.read_text().count("\n#")  # comments kept
    assert {p: p.read_text() for p in committed} == committed
    _tool("kubernetes-validate")
    _tool("hadolint")
    check = subprocess.run([sys.executable, str(DEPLOY / "deploy_check.py"), "--rendered", str(tmp_path / "kubernetes")],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    # overlays and rendered manifests (validated, and nginx -t on their front), KServe fronts, Dockerfiles
    assert check.stdout.count("ok   ") == len(OVERLAYS) * 4 + len(KSERVE_FILES) + len(DOCKERFILES), check.stdout
    assert check.stdout.count("nginx -t") == len(OVERLAYS) * 2 + len(KSERVE_FILES), check.stdout
    for wrong in ("", "ghcr.io/acme/torchserve-cam", "ghcr.io/a cme"):  # a registry path only, no image name
        with pytest.raises(ValueError):
            deploy_render.image_name(wrong)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policy(dockerfile):
    text = dockerfile.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    from_lines = [line for line in instructions if line.startswith("FROM")]
    base_args = dict(line.removeprefix("ARG ").split("=", 1) for line in instructions
                     if line.startswith("ARG ") and "=" in line)
    for line in from_lines:
        image = line.split()[1]
        image = base_args.get(image.strip("${}"), image)
        assert ":" in image and not image.endswith(":latest"), line
    users = [line for line in instructions if line.startswith("USER")]
    assert users and users[-1].split()[1].split(":")[0] not in {"root", "0"}
    assert any(line.startswith("HEALTHCHECK") for line in instructions)
    assert "probe.py" in text and "start.sh" in text
    assert "torch==${TORCH_VERSION}" in text and "TORCH_VERSION=2.14.1" in text


def test_container_config_and_start_script_pass_the_shared_checks():
    props = config_check.parse_properties((DOCKER / "config.properties").read_text())
    assert_secure_config(props, "deploy/docker/config.properties")
    assert config_check.check_start_script((DOCKER / "start.sh").read_text()) == []
    # The start script runs the same checker on itself and the config before starting TorchServe.
    assert 'config_check.py" "${TS_CONFIG}" "${BASH_SOURCE[0]}"' in (DOCKER / "start.sh").read_text()


def test_repo_root_config_passes_the_shared_checks():
    root_config = ROOT / "config.properties"
    if not root_config.exists():
        pytest.skip("repository-root config.properties is not on this branch yet (serving layer not merged)")
    props = config_check.parse_properties(root_config.read_text())
    assert_secure_config(props, "config.properties")


@pytest.mark.parametrize("bad, finding", [
    ("disable_token_authorization=true", "token authorization is disabled"),
    ("enable_model_api=true", "model API is enabled"),
    ("enable_envvars_config=true", "enable_envvars_config"),
    ("management_address=http://0.0.0.0:8081", "non-loopback"),
    ("metrics_mode=log", "metrics_mode"),
    ("model_metrics_auto_detect=false", "model_metrics_auto_detect"),
])
def test_checker_rejects_insecure_configs(bad, finding):
    text = (DOCKER / "config.properties").read_text() + "\n" + bad + "\n"
    findings = config_check.check_properties(config_check.parse_properties(text))
    assert len(findings) == 1 and finding in findings[0], findings


@pytest.mark.parametrize("line", [
    "exec torchserve --start --disable-token-auth", "torchserve --start --enable-model-api",
    "export TS_DISABLE_TOKEN_AUTHORIZATION=true\ntorchserve --start",
])
def test_checker_rejects_insecure_start_scripts(line):
    assert config_check.check_start_script(line)


def test_start_script_refuses_insecure_config(tmp_path):
    """Run the real start.sh up to its check: it must exit non-zero before starting anything."""
    bad = tmp_path / "config.properties"
    bad.write_text((DOCKER / "config.properties").read_text() + "\ndisable_token_authorization=true\n")
    app = tmp_path / "app"
    (app / "deploy").mkdir(parents=True)
    shutil.copy(DOCKER / "config_check.py", app / "deploy" / "config_check.py")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "APP_DIR": str(app), "TS_CONFIG": str(bad),
           "TS_RUN_DIR": str(tmp_path / "run"), "MODEL_STORE": str(tmp_path / "store")}
    result = subprocess.run(["bash", str(DOCKER / "start.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "refusing to start: token authorization is disabled" in result.stderr


# ---------------------------------------------------------------------- probe (loopback only)

class FakeTorchServe:
    """Loopback stand-in for TorchServe's token rules: inference on one port, management on another,
    both answering 400 InvalidKeyException without the current key, and /token rotation with the API key."""

    def __init__(self, key_file: Path, expires_in: dt.timedelta = dt.timedelta(minutes=60)):
        self.key_file = key_file
        self.keys = {"inference": "inf-1", "management": "mgmt-1", "API": "api-key"}
        self.rotations: list[str] = []
        self.received: list[tuple[str, str, dict, bytes]] = []
        self.worker_status = "READY"
        self.worker_pid = os.getpid()
        self.predict_delay = 0.0
        self._write(expires_in)
        self.inference = self._serve("inference")
        self.management = self._serve("management")

    def _write(self, expires_in: dt.timedelta) -> None:
        stamp = (dt.datetime.now(dt.timezone.utc) + expires_in).strftime("%Y-%m-%dT%H:%M:%S.123456789Z")
        self.key_file.write_text(json.dumps({
            "management": {"key": self.keys["management"], "expiration time": stamp},
            "inference": {"key": self.keys["inference"], "expiration time": stamp},
            "API": {"key": self.keys["API"]}}))

    def _serve(self, kind: str) -> ThreadingHTTPServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self, key_kind):
                return self.headers.get("Authorization") == f"Bearer {fake.keys[key_kind]}"

            def do_GET(self):  # noqa: N802
                if kind == "management" and self.path.startswith("/token?type="):
                    if not self._authorised("API"):
                        return self._send(400, {"type": "InvalidKeyException"})
                    rotated = self.path.split("=", 1)[1]
                    fake.keys[rotated] = f"{rotated}-{len(fake.rotations) + 2}"
                    fake.rotations.append(rotated)
                    fake._write(dt.timedelta(minutes=60))
                    return self._send(200, {})
                if not self._authorised(kind):
                    return self._send(400, {"code": 400, "type": "InvalidKeyException"})
                if self.path == "/ping":
                    return self._send(200, {"status": "Healthy"})
                if self.path == "/models":
                    return self._send(200, {"models": [{"modelName": "efficientnet_lite0"}]})
                if self.path == "/models/efficientnet_lite0":
                    return self._send(200, [{"workers": [{"status": fake.worker_status, "pid": fake.worker_pid}]}])
                return self._send(404, {})

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.received.append((self.path, self.headers.get("Authorization"),
                                      {k.lower(): v for k, v in self.headers.items()}, body))
                if not self._authorised("inference"):
                    return self._send(400, {"code": 400, "type": "InvalidKeyException"})
                time.sleep(fake.predict_delay)
                return self._send(200, {"path": self.path, "bytes": len(body)})

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def url(self, server: ThreadingHTTPServer) -> str:
        return f"http://127.0.0.1:{server.server_address[1]}"

    def close(self):
        for server in (self.inference, self.management):
            server.shutdown()
            server.server_close()


@pytest.fixture
def fake_ts(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json")
    yield fake
    fake.close()


def test_read_tokens_parses_torchserve_key_file_format(tmp_path):
    key_file = tmp_path / "key_file.json"
    # Verbatim shape of a TorchServe 0.12.0 key_file.json (nanosecond timestamps, API key without expiry).
    key_file.write_text('{"management": {"key": "G7HfSjLs", "expiration time": "2026-11-26T21:59:12.980089273Z"},'
                        ' "inference": {"key": "b6ftaZ06", "expiration time": "2026-11-26T21:59:12.980078347Z"},'
                        ' "API": {"key": "NiKBIWzv"}}')
    tokens = ts_tokens.read_tokens(key_file)
    assert tokens["inference"].key == "b6ftaZ06" and tokens["API"].expires is None
    assert tokens["inference"].expires == dt.datetime(2026, 11, 26, 21, 59, 12, 980078, tzinfo=dt.timezone.utc)
    before = dt.datetime(2026, 11, 26, 21, 58, 0, tzinfo=dt.timezone.utc)
    assert not tokens["inference"].expiring(before)
    assert tokens["inference"].expiring(before + dt.timedelta(seconds=30))  # inside the 60 s margin


def test_probe_live_and_ready_use_the_tokens(fake_ts):
    source = ts_tokens.TokenSource(fake_ts.key_file, fake_ts.url(fake_ts.management))
    assert probe.check_live(source, fake_ts.url(fake_ts.inference)) == (True, "/ping status 'Healthy'")
    assert probe.check_ready(source, [])[0] is True
    fake_ts.worker_status = "UNLOADING"
    ok, message = probe.check_ready(source, ["efficientnet_lite0"])
    assert not ok and "no READY worker" in message
    fake_ts.keys["inference"] = "changed-behind-our-back"  # file now stale: /ping must fail, not pass
    ok, message = probe.check_live(source, fake_ts.url(fake_ts.inference))
    assert not ok and "HTTP 400" in message


def test_probe_drain_turns_readiness_false_then_waits_for_a_barrier(fake_ts, monkeypatch):
    """preStop: the drain marker makes readiness fail at once; the barrier goes through TorchServe."""
    monkeypatch.setenv("TS_KEY_FILE", str(fake_ts.key_file))
    monkeypatch.setenv("TS_MANAGEMENT_URL", fake_ts.url(fake_ts.management))
    monkeypatch.setenv("TS_PID_CHECK", "0")
    monkeypatch.setenv("TS_INFERENCE_URL", fake_ts.url(fake_ts.inference))
    monkeypatch.setenv("TS_PROBE_PREDICT_TIMEOUT_S", "0")
    source = ts_tokens.TokenSource(fake_ts.key_file, fake_ts.url(fake_ts.management))
    assert probe.main(["ready"]) == 0
    ok, message = probe.drain(source, fake_ts.url(fake_ts.inference), delay=0, grace=5)
    assert ok and message == "drained efficientnet_lite0"
    barrier = [r for r in fake_ts.received if r[0] == "/predictions/efficientnet_lite0"]
    assert len(barrier) == 1 and barrier[0][3] == b"" and barrier[0][1] == "Bearer inf-1"
    assert probe.main(["ready"]) == 1


def test_probe_ready_is_false_while_a_worker_reports_its_audit_unwritable(fake_ts, monkeypatch, tmp_path):
    """The audit side's contract: ``audit-unavailable-<model>`` (one line: why) in $CAM_STATUS_DIR."""
    status = tmp_path / "status"
    status.mkdir()
    monkeypatch.setenv("CAM_STATUS_DIR", str(status))
    source = ts_tokens.TokenSource(fake_ts.key_file, fake_ts.url(fake_ts.management))
    assert probe.check_ready(source, [], pid_check=False)[0] is True
    (status / "audit-unavailable-audit_strict").write_text("database or disk is full\nmore\n")
    assert probe.check_ready(source, [], pid_check=False) == (
        False, "audit of model audit_strict cannot write: database or disk is full")
    monkeypatch.delenv("CAM_STATUS_DIR")  # default: TorchServe's run directory, where key_file.json is
    assert probe.check_ready(source, [], pid_check=False)[0] is True
    (fake_ts.key_file.parent / "audit-unavailable-x").write_text("read-only file system\n")
    assert probe.check_ready(source, [], pid_check=False)[0] is False


def test_probe_ready_checks_worker_pids_and_a_real_prediction(fake_ts, monkeypatch):
    source = ts_tokens.TokenSource(fake_ts.key_file, fake_ts.url(fake_ts.management))
    fake_ts.worker_pid = 2**22 + 12345  # above pid_max's default: no such process
    ok, message = probe.check_ready(source, ["efficientnet_lite0"], pid_check=True)
    assert not ok and "no live worker process" in message
    fake_ts.worker_pid = os.getpid()
    assert probe.check_ready(source, ["efficientnet_lite0"], pid_check=True)[0] is True
    ok, message = probe.check_ready(source, ["efficientnet_lite0"], pid_check=True,
                                    inference_url=fake_ts.url(fake_ts.inference), predict_timeout=2)  # fmt: skip
    assert ok, message
    (path, _, headers, body) = fake_ts.received[-1]
    assert path == "/predictions/efficientnet_lite0" and body == probe.tiny_png() and headers["content-type"] == "image/png"
    fake_ts.predict_delay = 3  # a hung worker: no answer within the bound
    ok, message = probe.check_ready(source, ["efficientnet_lite0"], pid_check=True,
                                    inference_url=fake_ts.url(fake_ts.inference), predict_timeout=1)  # fmt: skip
    assert not ok and "no answer to a prediction within 1s" in message


def test_expiring_token_is_rotated_once_with_the_api_key(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json", expires_in=dt.timedelta(seconds=10))
    try:
        source = ts_tokens.TokenSource(fake.key_file, fake.url(fake.management))
        assert probe.check_live(source, fake.url(fake.inference))[0] is True
        assert fake.rotations == ["inference"]
        assert ts_tokens.read_tokens(fake.key_file)["inference"].key == fake.keys["inference"] == "inference-2"
        assert probe.check_live(source, fake.url(fake.inference))[0] is True
        assert fake.rotations == ["inference"], "a fresh token must not be rotated again"
    finally:
        fake.close()
