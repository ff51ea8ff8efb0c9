"""Shared fixtures: the oracle, and one real TorchServe on free loopback ports serving every archive
in ``serving.py`` (started once per session, stopped at the end).

Markers (``docs/contributing.md``): ``server`` is set here on every test that needs the session TorchServe
(``pytest -m "not server"`` is the quick inner loop); ``peer`` marks the heavy agreement grids, which run
only with ``--peer`` (``make test-peer``); ``slow`` and ``cuda`` are set by the modules themselves;
``serves(MODEL, ...)`` names the session models a module uses where its source does not name them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.oracle import oracle_module  # noqa: E402

pytest_plugins = ["tests.helpers.budget"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--peer", action="store_true", help="also run the tests marked peer (make test-peer)")
    parser.addoption("--reverse-files", action="store_true",
                     help="run the test files in reverse order (each file's tests in their own order): the suite "
                          "must pass in any order")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, deselected = [], []
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
        if item.get_closest_marker("peer") and not config.getoption("--peer"):
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
    if config.getoption("--reverse-files"):
        files = list(dict.fromkeys(item.nodeid.split("::", 1)[0] for item in items))[::-1]
        rank = {name: index for index, name in enumerate(files)}
        items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])  # stable: a file keeps its order


@pytest.fixture
def oracle(monkeypatch):
    """pytorch-grad-cam 1.5.7, the test-only oracle, with its eigen projections' sign aligned."""
    return oracle_module(monkeypatch)


@pytest.fixture(scope="module")
def resnet():
    """``resnet18(num_classes=10)``, random weights seeded with 0, in eval mode; one per module (tests hook it)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="session")
def trained_cnn():
    """The localisation CNN of tests/helpers/synthetic.py, trained once per machine (seconds, no downloads;
    the weights are cached, keyed by the training code)."""
    import torch

    from tests.helpers.synthetic import SmallCNN, trained

    torch.manual_seed(0)  # the initial weights too: the suite passes in any order
    model = SmallCNN()
    accuracy = trained(model, steps=80, size=64)
    assert accuracy >= 0.95, f"the CNN did not learn the task (accuracy {accuracy:.2f})"
    return model


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A TorchServe started once per session (token auth on, model API off), stopped at the end: every test
    archive registered, with no worker until a module asks for it (``server``, tests/helpers/workers.py)."""
    from model_store import serve
    from tests.helpers.archive_cache import build_cached
    from tests.helpers.serving import TEST_ARCHIVES
    from tests.helpers.workers import Workers, session_config

    workdir = tmp_path_factory.mktemp("torchserve")
    store = workdir / "model_store"
    names = build_cached(TEST_ARCHIVES, store)  # once per set of inputs
    ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
    config = session_config(serve.REPO_ROOT / "config.properties", store, names, workdir / "session.properties")
    try:
        running = serve.start(workdir, store, names, ports=ports, timeout=240, base_config=config, wait_for=[])
        workers = Workers(running, names)
    except BaseException:
        serve.stop(workdir)
        raise
    try:
        yield running, workers
    finally:
        serve.stop(workdir)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, torchserve) -> object:
    """The session TorchServe, with one worker for each model this module uses (tests/helpers/workers.py:
    the ``serves`` marker's models, else those the module's source names)."""
    from tests.helpers.workers import models_used

    running, workers = torchserve
    workers.ensure(models_used(request.module, workers.names, request.node.get_closest_marker("serves")))
    return running


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL (Debian's server, tests/helpers/postgres.py) started once per session, stopped at the end."""
    from tests.helpers.postgres import PostgresServer, find_postgres

    pytest.importorskip("psycopg", reason="psycopg is in the audit-postgres extra")
    bindir = find_postgres()
    if bindir is None:
        pytest.skip("no PostgreSQL server (tests/ensure_debian.sh installs Debian's postgresql as root)")
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()
