"""Fixtures for the lymph-chaos Python client tests.

``test_unit.py`` needs nothing. The other tests need a running setup, described by environment variables (the Rust
wrapper ``tests/tests/zk_python_client.rs`` starts ZooKeeper, a supervised lymph ``Echo``, and a Chaos agent in a
network namespace, then runs pytest inside that namespace with these set):

- ``CHAOS_PY_ZK_HOSTS``: kazoo hosts string with the chroot the agent and Echo use (``127.0.0.1:<port>/<chroot>``)
- ``CHAOS_PY_ZK_ADDR``: the same ZooKeeper without chroot (tests make empty chroots of their own there)
- ``CHAOS_PY_SERVICE``: the service the faults are aimed at (``Echo``, restarted whenever it dies)
- ``CHAOS_PY_IMPORT``: where ``Scenario`` is imported from: ``lymph.chaos`` or ``lymph_chaos``
- ``CHAOS_PY_EXPECT_LYMPH``: ``1`` when lymph 0.15 is installed next to the client, ``0`` when it must not be
- ``CHAOS_PY_REQUIRE_ALL=1``: a missing variable fails the test instead of skipping it
- ``CHAOS_PY_GEVENT=1``: run everything gevent-patched (``lymph.monkey.patch()``), as lymph programs do
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List

import pytest

REQUIRE_ALL = os.environ.get("CHAOS_PY_REQUIRE_ALL") == "1"

# test_pytest_plugin.py runs pytest inside pytest (the `pytester` fixture).
pytest_plugins = ["pytester"]


@dataclass(frozen=True)
class Env:
    zk_hosts: str
    zk_addr: str
    service: str
    import_path: str


def _require(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        message = f"{name} is not set (run through `cargo xtask test --tier zk -- zk_python`)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return value


@pytest.fixture(scope="session")
def import_path() -> str:
    """The module ``Scenario`` is imported from in these tests."""
    return os.environ.get("CHAOS_PY_IMPORT", "lymph_chaos")


@pytest.fixture(scope="session")
def scenario_cls(import_path: str) -> Any:
    """``Scenario``, imported the way this run asks (``lymph.chaos`` or ``lymph_chaos``)."""
    return importlib.import_module(import_path).Scenario


@pytest.fixture
def env(import_path: str) -> Env:
    """The running setup (skips, or fails with ``CHAOS_PY_REQUIRE_ALL=1``, without one)."""
    return Env(
        zk_hosts=_require("CHAOS_PY_ZK_HOSTS"),
        zk_addr=_require("CHAOS_PY_ZK_ADDR"),
        service=_require("CHAOS_PY_SERVICE"),
        import_path=import_path,
    )


@pytest.fixture
def new_scenario(env: Env, scenario_cls: Any) -> Iterator[Callable[..., Any]]:
    """Makes scenarios on the test setup; at teardown closes them and clears every fault left on the agents."""
    made: List[Any] = []

    def make(**options: Any) -> Any:
        sn = scenario_cls(env.zk_hosts, **options)
        made.append(sn)
        return sn

    yield make
    for sn in made:
        sn.close()
    admin = scenario_cls(env.zk_hosts)
    try:
        admin.clear()
    finally:
        admin.close()


def pytest_configure(config: Any) -> None:
    """With ``CHAOS_PY_GEVENT=1`` everything runs gevent-patched, as lymph's own pytest plugin would make it.

    (lymph 0.15's plugin, ``lymph.testing.pytest``, cannot load in the test venv — ``lymph.testing`` imports
    ``kazoo.testing``, which needs pyOpenSSL — so the wrapper runs pytest with ``-p no:lymph`` and patches here.)
    """
    if os.environ.get("CHAOS_PY_GEVENT") == "1":
        import lymph.monkey

        lymph.monkey.patch()
