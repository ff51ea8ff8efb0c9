"""Offline checks of the deployment files (`make deploy-check`; tests/test_deploy.py uses the same functions).

    python deploy/deploy_check.py                      # every overlay and Dockerfile in deploy/
    python deploy/deploy_check.py --rendered build/deploy/kubernetes   # also the manifests `make deploy-render` wrote

- each kustomize overlay renders (``kubectl kustomize``) and validates against the Kubernetes 1.30 schemas
  (``kubernetes-validate --strict``; CRDs such as ServiceMonitor are skipped by the validator);
- each Dockerfile is hadolint-clean.

Needs kubectl (with kustomize) on PATH and kubernetes-validate and hadolint (the ``deploy`` extra; tools
next to this interpreter are found first). Exit code 0 when everything passes, 1 when a check fails,
2 when a tool is missing. No cluster, Docker engine or network is used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["OVERLAYS", "DOCKERFILES", "ToolMissing", "find_tool", "render_overlay", "validate_manifest",
           "hadolint", "main"]

DEPLOY = Path(__file__).resolve().parent
OVERLAYS = ["cpu", "gpu", "gpu-prometheus"]
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))
KUBERNETES_VERSION = "1.30.0"


class ToolMissing(RuntimeError):
    """A command-line tool the checks need is not installed."""


def find_tool(name: str) -> str:
    """Path of a CLI tool: next to this interpreter (a venv) first, then PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
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
