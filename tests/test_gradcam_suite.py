"""grad-cam 1.5.7's own test suite, run against cam_engine after a mechanical rename.

The sdist is downloaded from the package registry into a cache (see ``tests/helpers/gradcam_suite.py``);
its tests are rewritten (``pytorch_grad_cam`` -> ``cam_engine``, pretrained weights -> random init)
and run in a subprocess. Contract: every test that passes against grad-cam itself (recorded in
``tests/gradcam_suite_baseline.json`` by ``make test-peer``, which reruns both) passes against
cam_engine, except the documented deliberate differences. ``make test`` runs a representative
subset (``quick_subset``); ``GRADCAM_SUITE=full`` (``make test-peer``) the whole suite.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.gradcam_suite import BASELINE, DELIBERATE, collect, prepare, quick_subset, run, summary


@pytest.fixture(scope="module")
def baseline() -> dict[str, str]:
    return json.loads(BASELINE.read_text())


def test_gradcam_suite_passes_where_gradcam_passes(baseline):
    full = os.environ.get("GRADCAM_SUITE") == "full"
    try:
        # The subset is taken from the baseline (a separate collection run costs ~10 s); a baseline name
        # the suite lacks then shows as a selected test that did not run.
        nodes = collect("cam_engine") if full else (prepare("cam_engine") and list(baseline))
    except Exception as error:  # noqa: BLE001 - no registry, no sdist: say so rather than pass
        pytest.skip(f"grad-cam's sdist is not available: {error}")
    assert set(baseline) <= set(nodes), "the recorded baseline names tests the suite does not have"
    selected = nodes if full else [node for node in nodes if quick_subset(node)]
    # "unmeasured": the baseline run did not reach the test (grad-cam's ScoreCAM SESS at 224 is slow)
    assert not [node for node in selected if node not in baseline], "selected tests without a baseline outcome"
    results = run("cam_engine", selected)
    print(f"grad-cam 1.5.7 suite against cam_engine ({'full' if full else 'subset'}): {summary(results)}")
    assert set(results) == set(selected), "some selected tests did not run"
    regressions = [
        node for node in selected
        if baseline[node] == "passed" and results[node] != "passed" and node not in DELIBERATE
    ]
    assert not regressions, f"pass against grad-cam, fail against cam_engine: {regressions}"
    unexpected = [node for node in DELIBERATE if node in results and results[node] == "passed"]
    assert not unexpected, f"listed as deliberate differences but pass: {unexpected}"
