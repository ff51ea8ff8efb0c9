"""Security checks for a TorchServe config.properties and the script that starts TorchServe.

One checker for every place TorchServe is started from: the container's start script runs it before
TorchServe starts (and refuses to start on a finding), and ``tests/test_deploy.py`` applies it to the
container config, the Kubernetes ConfigMap, the KServe config and the repository-root config.

The rules (TorchServe 0.12 semantics):

- token authorization stays on: ``disable_token_authorization`` is not true, and no start command passes
  ``--disable-token-auth`` or sets ``TS_DISABLE_TOKEN_AUTHORIZATION``;
- the model API stays off: ``enable_model_api`` is not true, no ``--enable-model-api`` and no
  ``TS_ENABLE_MODEL_API``;
- ``enable_envvars_config`` is not true, because with it any ``TS_*`` environment variable (for example
  ``TS_DISABLE_TOKEN_AUTHORIZATION=true`` injected into a pod) would override the file;
- metrics are exported in Prometheus format (``metrics_mode=prometheus``), the handlers' own included
  (``model_metrics_auto_detect=true``: without it TorchServe drops metrics it was not configured with);
- the management API is never bound to a non-loopback address (it can rotate tokens and, if someone
  enabled it, register models).

Stdlib only: it runs in the image before anything else is imported.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_TRUE = {"true", "yes", "1", "on"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}

# Flags and environment variables that switch a protection off, as they would appear in a start script.
_FORBIDDEN_SCRIPT_PATTERNS = {
    r"--disable-token-auth\b": "passes --disable-token-auth",
    r"--enable-model-api\b": "passes --enable-model-api",
    r"TS_DISABLE_TOKEN_AUTHORIZATION\s*=\s*['\"]?(true|yes|1)": "sets TS_DISABLE_TOKEN_AUTHORIZATION",
    r"TS_ENABLE_MODEL_API\s*=\s*['\"]?(true|yes|1)": "sets TS_ENABLE_MODEL_API",
    r"enable_envvars_config\s*=\s*['\"]?(true|yes|1)": "enables enable_envvars_config",
}


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java-properties text the way TorchServe's launcher does: ``key=value`` lines, ``#`` comments.

    Later keys override earlier ones, as in ``java.util.Properties``; keys keep their case (TorchServe's
    keys are case-sensitive).
    """
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        if sep:
            props[key.strip()] = value.strip()
    return props


def _host_of(address: str) -> str:
    match = re.match(r"^\w+://(\[[^\]]+\]|[^:/]+)", address)
    return match.group(1) if match else ""


def check_properties(props: dict[str, str], *, require_prometheus: bool = True) -> list[str]:
    """Return the security findings for parsed config.properties (an empty list means it passes)."""
    findings: list[str] = []
    if props.get("disable_token_authorization", "false").lower() in _TRUE:
        findings.append("token authorization is disabled (disable_token_authorization=true)")
    if props.get("enable_model_api", "false").lower() in _TRUE:
        findings.append("the model API is enabled (enable_model_api=true)")
    if props.get("enable_envvars_config", "false").lower() in _TRUE:
        findings.append("enable_envvars_config=true lets TS_* environment variables override these settings")
    if require_prometheus and props.get("metrics_mode", "log") != "prometheus":
        findings.append(f"metrics_mode is {props.get('metrics_mode', 'log (default)')!r}, not 'prometheus'")
    if require_prometheus and props.get("model_metrics_auto_detect", "false").lower() not in _TRUE:
        findings.append("model_metrics_auto_detect is not true: the handlers' metrics would never reach /metrics")
    management = props.get("management_address")
    if management is not None and _host_of(management) not in _LOOPBACK_HOSTS:
        findings.append(f"management API bound to a non-loopback address: {management}")
    return findings


def check_start_script(text: str) -> list[str]:
    """Return the findings for a shell script (or command line) that starts TorchServe."""
    findings = []
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for pattern, message in _FORBIDDEN_SCRIPT_PATTERNS.items():
        if re.search(pattern, code, flags=re.IGNORECASE):
            findings.append(f"start script {message}")
    if "torchserve" not in code:
        findings.append("start script never starts torchserve")
    return findings


def check_config_file(path: str | Path, *, require_prometheus: bool = True) -> list[str]:
    """Read and check a config.properties file."""
    return check_properties(parse_properties(Path(path).read_text()), require_prometheus=require_prometheus)


def main(argv: list[str]) -> int:
    """``python config_check.py CONFIG [START_SCRIPT]``: print findings, exit 1 if there are any."""
    if not argv:
        print("usage: config_check.py CONFIG_PROPERTIES [START_SCRIPT]", file=sys.stderr)
        return 2
    findings = check_config_file(argv[0])
    if len(argv) > 1:
        findings += check_start_script(Path(argv[1]).read_text())
    for finding in findings:
        print(f"refusing to start: {finding}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
