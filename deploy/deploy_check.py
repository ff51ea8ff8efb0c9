"""Offline checks of the deployment files (`make deploy-check`; tests/test_deploy.py uses the same functions).

    python deploy/deploy_check.py                      # every overlay and Dockerfile in deploy/
    python deploy/deploy_check.py --rendered build/deploy/kubernetes   # also the manifests `make deploy-render` wrote

- each kustomize overlay renders (``kubectl kustomize``) and validates against the Kubernetes 1.30 schemas
  (``kubernetes-validate --strict``; CRDs such as ServiceMonitor are skipped by the validator);
- each Dockerfile is hadolint-clean;
- the front's nginx config, rendered (``docker/front.py``) from the environment of every front container in
  the overlays and KServe specs, passes ``nginx -t``.

Needs kubectl (with kustomize) on PATH, nginx (``tests/ensure_debian.sh nginx 'test -x /usr/sbin/nginx'`` installs Debian's), and
kubernetes-validate and hadolint (the ``deploy`` extra; tools next to this interpreter are found first). Exit code 0 when everything passes, 1 when a check fails,
2 when a tool is missing. No cluster, Docker engine or network is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["OVERLAYS", "DOCKERFILES", "KSERVE_SPECS", "ToolMissing", "find_tool", "render_overlay",
           "validate_manifest", "hadolint", "front_environments", "check_front", "main"]

DEPLOY = Path(__file__).resolve().parent
OVERLAYS = ["cpu", "cpu-audit-postgres", "gpu", "gpu-prometheus"]
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))
KSERVE_SPECS = sorted((DEPLOY / "kserve").glob("inferenceservice*.yaml"))
KUBERNETES_VERSION = "1.30.0"


class ToolMissing(RuntimeError):
    """A command-line tool the checks need is not installed."""


def find_tool(name: str) -> str:
    """Path of a CLI tool: next to this interpreter (a venv) first, then PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if not found:
        raise ToolMissing(f"{name} is required for the deployment checks but was not found (venv or PATH); "
                          "install it (kubectl from your distribution, the others: pip install -e '.[deploy]')")
    return found


def render_overlay(overlay: str | Path) -> str:
    """``kubectl kustomize`` of an overlay (a name under deploy/kubernetes/overlays, or a directory): YAML text."""
    path = Path(overlay) if Path(overlay).is_dir() else DEPLOY / "kubernetes" / "overlays" / str(overlay)
    result = subprocess.run([find_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed: {result.stderr.strip()}")
    return result.stdout


def validate_manifest(text: str, version: str = KUBERNETES_VERSION) -> tuple[bool, str]:
    """``kubernetes-validate -k VERSION --strict`` on YAML ``text``: ``(passed, its output)``. Its output has
    one "passed for resource" line per built-in object it checked."""
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as folder:
        manifest = Path(folder) / "manifest.yaml"
        manifest.write_text(text)
        result = subprocess.run([find_tool("kubernetes-validate"), "-k", version, "--strict", str(manifest)],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
    return result.returncode == 0, result.stdout + result.stderr


def hadolint(dockerfile: Path) -> tuple[int, list[dict]]:
    """hadolint's exit code and findings (JSON objects: line, code, message) for one Dockerfile."""
    result = subprocess.run([find_tool("hadolint"), "--no-color", "--format", "json", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    return result.returncode, json.loads(result.stdout or "[]")


def front_environments(manifest: str) -> list[dict[str, str]]:
    """The environment of every container that runs ``front.py`` in a manifest (YAML text, several documents)."""
    import yaml

    found = []
    for doc in yaml.safe_load_all(manifest):
        spec = (doc or {}).get("spec", {})
        pods = [spec.get("template", {}).get("spec", {}), spec.get("predictor", {})]
        for pod in pods:
            for container in pod.get("containers", []) or []:
                if any("front.py" in part for part in container.get("command", [])):
                    found.append({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
    return found


def check_front(env: dict[str, str]) -> tuple[bool, str]:
    """Render the front's nginx config from a container's environment and run ``nginx -t`` on it."""
    sys.path.insert(0, str(DEPLOY / "docker"))
    import front

    with tempfile.TemporaryDirectory(prefix="deploy-check-front-") as folder:
        settings = front.Settings.from_env({**env, "GATE_STATE_DIR": folder, "GATE_NGINX": find_tool("nginx")})
        front.render_all(settings)
        return front.check_config(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/deploy_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rendered", type=Path, default=None,
                        help="also validate every *.yaml in this folder (what make deploy-render wrote)")  # fmt: skip
    args = parser.parse_args(argv)
    failures = 0
    try:
        manifests = [(f"overlay {name}", render_overlay(name)) for name in OVERLAYS]
        if args.rendered is not None:
            manifests += [(str(p), p.read_text()) for p in sorted(args.rendered.glob("*.yaml"))]
        for where, text in manifests:
            passed, output = validate_manifest(text)
            checked = output.count("passed for resource")
            print(f"{'ok  ' if passed else 'FAIL'} {where}: kubernetes-validate {KUBERNETES_VERSION} --strict, "
                  f"{checked} objects checked")  # fmt: skip
            if not passed:
                failures += 1
                print("     " + "\n     ".join(output.strip().splitlines()[-15:]))
        fronts = [(f"{where} front", env) for where, text in manifests for env in front_environments(text)]
        fronts += [(f"{p.relative_to(DEPLOY.parent)} front", env) for p in KSERVE_SPECS
                   for env in front_environments(p.read_text())]  # fmt: skip
        for where, env in fronts:
            passed, output = check_front(env)
            print(f"{'ok  ' if passed else 'FAIL'} {where}: nginx -t on the rendered config")
            if not passed:
                failures += 1
                print("     " + "\n     ".join(output.strip().splitlines()[-10:]))
        for dockerfile in DOCKERFILES:
            code, findings = hadolint(dockerfile)
            clean = code == 0 and not findings
            print(f"{'ok  ' if clean else 'FAIL'} {dockerfile.relative_to(DEPLOY.parent)}: hadolint, "
                  f"{len(findings)} finding(s)")  # fmt: skip
            for finding in findings:
                print(f"     line {finding.get('line')}: {finding.get('code')} {finding.get('message')}")
            failures += not clean
    except ToolMissing as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"FAIL {error}")
        return 1
    print("deployment checks passed" if not failures else f"{failures} deployment check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
