"""Write the deployment manifests with your image name (`make deploy-render REGISTRY=... [VERSION=...]`).

    python deploy/deploy_render.py --registry ghcr.io/acme --version 0.1.0 --out build/deploy

The image `make image REGISTRY=...` builds is ``<registry>/torchserve-cam:<version>-cpu`` (and ``-gpu``);
the committed overlays and KServe specs name ``registry.example.com/ml/...``. This writes, under ``--out``:

- ``kustomize/<overlay>/kustomization.yaml``: the overlay plus a kustomize ``images`` entry that sets the
  image (``kubectl apply -k build/deploy/kustomize/gpu``);
- ``kubernetes/<overlay>.yaml``: that overlay rendered (``kubectl kustomize``; ``kubectl apply -f``);
- ``kserve/inferenceservice*.yaml``: the KServe specs with their ``image:`` lines set (comments kept).

Needs kubectl (with kustomize) for the rendered manifests; the committed files are never changed.
`make deploy-check` (``python deploy/deploy_check.py --rendered build/deploy/kubernetes``) validates the result.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_check import ToolMissing, find_tool  # noqa: E402

__all__ = ["COMMITTED_IMAGE", "image_name", "write_kustomization", "render_kserve", "render_all", "main"]

DEPLOY = Path(__file__).resolve().parent
OVERLAYS = {"cpu": "cpu", "cpu-audit-postgres": "cpu", "gpu": "gpu", "gpu-prometheus": "gpu"}  # overlay -> image flavour
COMMITTED_IMAGE = "registry.example.com/ml/torchserve-cam"  # what the committed overlays and specs name
IMAGE_LINE = re.compile(r"^(?P<lead>\s*image:\s*)(?P<image>\S+/torchserve-cam):(?P<version>[^\s#]+)-(?P<flavour>cpu|gpu)\b",
                        re.MULTILINE)  # fmt: skip


def image_name(registry: str) -> str:
    """``<registry>/torchserve-cam``, as `make image` tags it (no trailing slash, no tag)."""
    registry = registry.strip().rstrip("/")
    if not registry or any(c.isspace() for c in registry) or registry.endswith("/torchserve-cam"):
        raise ValueError(f"registry {registry!r}: give the registry path only, such as ghcr.io/acme")
    return f"{registry}/torchserve-cam"


def write_kustomization(overlay: str, registry: str, version: str, out: Path) -> Path:
    """``out/kustomize/<overlay>/kustomization.yaml``: the committed overlay with the image set."""
    folder = out / "kustomize" / overlay
    folder.mkdir(parents=True, exist_ok=True)
    source = os.path.relpath(DEPLOY / "kubernetes" / "overlays" / overlay, folder)
    text = (
        "# Written by deploy/deploy_render.py (make deploy-render): the committed overlay with your image.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {source}\n"
        f"images:\n  - name: {COMMITTED_IMAGE}\n    newName: {image_name(registry)}\n"
        f"    newTag: {version}-{OVERLAYS[overlay]}\n"
    )
    path = folder / "kustomization.yaml"
    path.write_text(text)
    return path


def render_kserve(text: str, registry: str, version: str) -> str:
    """A KServe spec's text with every torchserve-cam ``image:`` line set to ``<registry>/torchserve-cam:<version>-<flavour>``."""
    name = image_name(registry)
    rendered, count = IMAGE_LINE.subn(lambda m: f"{m['lead']}{name}:{version}-{m['flavour']}", text)
    if count == 0:
        raise ValueError("no torchserve-cam image line found")
    return rendered


def render_all(registry: str, version: str, out: Path) -> list[Path]:
    """Every overlay (kustomization + rendered YAML) and KServe spec under ``out``; returns the files written."""
    written = []
    (out / "kubernetes").mkdir(parents=True, exist_ok=True)
    for overlay in OVERLAYS:
        kustomization = write_kustomization(overlay, registry, version, out)
        result = subprocess.run([find_tool("kubectl"), "kustomize", str(kustomization.parent)], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {kustomization.parent}: {result.stderr.strip()}")
        manifest = out / "kubernetes" / f"{overlay}.yaml"
        manifest.write_text(result.stdout)
        written += [kustomization, manifest]
    (out / "kserve").mkdir(parents=True, exist_ok=True)
    for spec in sorted((DEPLOY / "kserve").glob("inferenceservice*.yaml")):
        target = out / "kserve" / spec.name
        target.write_text(render_kserve(spec.read_text(), registry, version))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/deploy_render.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="where `make image REGISTRY=...` pushed (ghcr.io/acme)")
    parser.add_argument("--version", required=True, help="the image version (pyproject's version by default in make)")
    parser.add_argument("--out", type=Path, default=Path("build/deploy"))
    args = parser.parse_args(argv)
    try:
        written = render_all(args.registry, args.version, args.out)
    except (ValueError, RuntimeError, ToolMissing) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print(f"apply: kubectl apply -k {args.out}/kustomize/cpu (or gpu, gpu-prometheus); "
          f"KServe: kubectl apply -f {args.out}/kserve/inferenceservice.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
