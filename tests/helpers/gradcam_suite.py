"""grad-cam 1.5.7's own test suite, run against cam_engine (or against grad-cam itself, as the baseline).

The suite ships in grad-cam's sdist (``tests/``). :func:`prepare` downloads the sdist from the
package registry into a cache (``$TORCHSERVE_CAM_CACHE`` or ``~/.cache/torchserve-cam``, never this
repository), copies its ``tests/`` and rewrites them mechanically, as a user switching libraries would:

* ``pytorch_grad_cam`` -> ``cam_engine`` (only for the cam_engine run);
* ``weights="DEFAULT"`` / ``pretrained=True`` / ``pretrained=False`` -> ``weights=None`` (random init:
  nothing may be downloaded here).

The suite reads ``examples/both.png``, which the sdist does not ship: a fixed 224x224 image
(``skimage.data.chelsea``, resized) is written there instead.

``python -m tests.helpers.gradcam_suite [cam_engine|pytorch_grad_cam] [pytest args]`` runs the whole grid and
prints the passed/failed/skipped figure (``make test-peer``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

VERSION = "1.5.7"
REPO = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    root = os.environ.get("TORCHSERVE_CAM_CACHE") or Path.home() / ".cache" / "torchserve-cam"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sdist() -> Path:
    """grad-cam's sdist in the cache, downloaded with pip when missing."""
    cache = cache_dir()
    found = sorted(cache.glob(f"grad_cam-{VERSION}.tar.gz")) + sorted(cache.glob(f"grad-cam-{VERSION}.tar.gz"))
    if found:
        return found[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         f"grad-cam=={VERSION}", "-d", str(cache)],
        check=True,
    )
    found = sorted(cache.glob("grad*cam-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no grad-cam sdist in {cache}")
    return found[0]


def rewrite(source: str, package: str) -> str:
    """The test file as a user would run it against ``package`` with randomly initialised models."""
    source = re.sub(r"weights\s*=\s*[\"']DEFAULT[\"']", "weights=None", source)
    source = re.sub(r"pretrained\s*=\s*(True|False)", "weights=None", source)
    if package != "pytorch_grad_cam":
        source = re.sub(r"\bpytorch_grad_cam\b", package, source)
    return source


def prepare(package: str = "cam_engine") -> Path:
    """A folder holding the rewritten ``tests/`` and ``examples/both.png``; returns that folder."""
    archive = sdist()
    target = cache_dir() / f"suite-{VERSION}-{package}"
    tests = target / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                text = tar.extractfile(member).read().decode()
                (tests / parts[2]).write_text(rewrite(text, package))
    image = target / "examples" / "both.png"
    if not image.exists():
        import cv2
        from skimage import data

        image.parent.mkdir(exist_ok=True)
        picture = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(image), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    return target


def run(package: str = "cam_engine", args: list[str] | tuple[str, ...] = (), timeout: float = 4 * 3600) -> dict[str, str]:
    """Run the rewritten suite in a subprocess; returns ``{node id: passed|failed|skipped}``."""
    target = prepare(package)
    report = target / f"report-{os.getpid()}.xml"  # one per run: runs may overlap
    report.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir",
         str(target), "--junitxml", str(report), *args, *([] if any("::" in a for a in args) else ["tests"])],
        cwd=target, env=env, timeout=timeout, check=False,
    )
    return outcomes(report)


#: Tests of the suite whose outcome differs on purpose, with the reason (see README, "Drop-in").
DELIBERATE = {
    "tests/test_finer_cam_correctness.py::test_finercam_htcore_is_single_underscore":
        "reads grad-cam's source text for its Habana HPU call (self.base_cam._htcore); cam_engine has no "
        "HPU-specific code",
}

BASELINE = REPO / "tests" / "gradcam_suite_baseline.json"


def quick_subset(node: str) -> bool:
    """The representative part of the suite that ``make test`` runs (the whole grid: ``make test-peer``).

    Every file except the 100-iteration memory loops, so every public name, signature and call convention
    of grad-cam's API is exercised; of the 192-case grid, each method once (resnet18, batch 2 at 32x32,
    eigen_smooth, top-class targets); RefineCAM+ARCC and SESS with one gradient and one gradient-free base
    method; every SESS option. The numbers of every method, with and without eigen_smooth and aug_smooth,
    are compared with grad-cam's in tests/test_oracle.py and tests/test_perturbation.py, so a wrong formula
    fails there; the vgg11 and class-100 rows of the grid run in ``make test-peer``.
    """
    if "test_context_release" in node:
        return False
    if "test_run_all_models" in node:
        if "-2-32-32-" not in node or "[ScoreCAM1-" in node:  # ScoreCAM is listed twice in the grid
            return False
        return "resnet18" in node and "-True-False-None-" in node
    if "test_refine_cam[" in node:
        return "2-112-112" in node and ("[GradCAM-" in node or "[EigenCAM-" in node)
    if "test_sess[" in node:
        return "[GradCAM-2-112-112]" in node or "[EigenCAM-1-224-160]" in node
    return True


def collect(package: str = "cam_engine") -> list[str]:
    """Node ids of the rewritten suite."""
    target = prepare(package)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    listing = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "--rootdir", str(target), "tests"],
        cwd=target, env=env, capture_output=True, text=True, timeout=600, check=False,
    ).stdout
    return [line.strip() for line in listing.splitlines() if "::" in line]


def outcomes(report: Path) -> dict[str, str]:
    """``{node id: passed|failed|skipped}`` from a JUnit XML report."""
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        node = f"{module}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            results[node] = "failed"
        elif case.find("skipped") is not None:
            results[node] = "skipped"
        else:
            results[node] = "passed"
    return results


def summary(results: dict[str, str]) -> str:
    counts = {k: sum(1 for v in results.values() if v == k) for k in ("passed", "failed", "skipped")}
    return f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped of {len(results)}"


if __name__ == "__main__":
    package = sys.argv[1] if len(sys.argv) > 1 else "cam_engine"
    args = sys.argv[2:]
    if args[:1] == ["--quick"]:
        args = [node for node in collect(package) if quick_subset(node) and all(k in node for k in args[1:])]
    results = run(package, args)
    for node, outcome in sorted(results.items()):
        if outcome != "passed":
            print(outcome.upper(), node)
    print(f"grad-cam {VERSION} suite against {package}: {summary(results)}")
