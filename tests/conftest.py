"""Shared fixtures: real services started once per session (see tests/support)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path

import docker
import pluggy
import pytest

from tests.support import services
from tests.support.index import serve_index

# Fixtures that need a service, and the marker a test using them gets, so that
# `-m "not docker"` deselects them without each test repeating the marker.
_FIXTURE_MARKERS = {
    "docker_client": "docker",
    "base_image": "docker",
    "registry_address": "docker",
    "azurite_endpoint": "azurite",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "network: uses the real public package index (deselect offline)"
    )
    config.addinivalue_line("markers", "docker: needs a Docker engine (started if missing)")
    config.addinivalue_line("markers", "azurite: needs the Azurite blob storage emulator")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixturenames = getattr(item, "fixturenames", ())
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in fixturenames:
                item.add_marker(marker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    # In CI a skip means a test that did not run while the run looks green;
    # report it as a failure instead. xfail is a deliberate outcome and stays.
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped tests fail when CI is set: {reason}"


@pytest.fixture(scope="session")
def azurite_endpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[services.AzuriteEndpoint]:
    with services.azurite(tmp_path_factory.mktemp("azurite")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def docker_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[docker.DockerClient]:
    with services.dockerd(tmp_path_factory.mktemp("dockerd")) as client:
        yield client


@pytest.fixture(scope="session")
def registry_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with services.registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    return services.local_base_image(docker_client)


@pytest.fixture(scope="session")
def _index_servers() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def local_index(
    tmp_path_factory: pytest.TempPathFactory, _index_servers: contextlib.ExitStack
) -> Callable[[Iterable[Path]], str]:
    """``local_index(dists) -> index URL`` serving a fresh folder per call."""

    def make(dists: Iterable[Path]) -> str:
        return _index_servers.enter_context(serve_index(dists, tmp_path_factory.mktemp("index")))

    return make
