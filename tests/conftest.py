"""Shared fixtures: the oracle, and one real TorchServe on free loopback ports serving every archive
in ``serving.py`` (started once per session, stopped at the end)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.oracle import oracle_module  # noqa: E402


@pytest.fixture
def oracle(monkeypatch):
    """pytorch-grad-cam 1.5.7, the test-only oracle, with its eigen projections' sign aligned."""
    return oracle_module(monkeypatch)


@pytest.fixture(scope="session")
def trained_cnn():
    """The localisation CNN of tests/helpers/synthetic.py, trained once per session (seconds, no downloads)."""
    from tests.helpers.synthetic import SmallCNN, train

    model = SmallCNN()
    accuracy = train(model, steps=80, size=64)
    assert accuracy >= 0.95, f"the CNN did not learn the task (accuracy {accuracy:.2f})"
    return model


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A TorchServe started once per session (token auth on, model API off), stopped at the end."""
    from model_store import serve
    from model_store.build import build_archive
    from tests.helpers.serving import TEST_ARCHIVES

    workdir = tmp_path_factory.mktemp("torchserve")
    store = workdir / "model_store"
    names = []
    for spec in TEST_ARCHIVES:
        archive = build_archive(spec, store, log=lambda line: None)
        names.append(archive.stem)
    ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
    try:
        running = serve.start(workdir, store, names, ports=ports, timeout=240)
    except BaseException:
        serve.stop(workdir)
        raise
    try:
        yield running
    finally:
        serve.stop(workdir)


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL (Debian's server, tests/helpers/postgres.py) started once per session, stopped at the end."""
    from tests.helpers.postgres import PostgresServer, find_postgres

    pytest.importorskip("psycopg", reason="psycopg is in the audit-postgres extra")
    bindir = find_postgres()
    if bindir is None:
        pytest.skip("no PostgreSQL server (tests/ensure_postgres.sh installs Debian's postgresql as root)")
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()
