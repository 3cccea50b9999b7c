"""pytest plugin (entry point ``pytest11``): chaos in tests, always reverted.

- ``--lymph-zookeeper HOSTS``: where the Chaos agents and the services are registered. Default: the ZooKeeper of
  lymph's configuration (``$LYMPH_CONFIG``, else ``.lymph.yml`` in the root dir or the current directory:
  ``container.registry.zkclient.hosts``), else ``127.0.0.1:2181/lymph``. ``--lymph-chaos-dry-run`` makes every fault
  a dry run; ``--lymph-chaos-timeout`` sets the agents' reply timeout.
- ``chaos``: a :class:`~lymph_chaos.Scenario` bound to the test. At teardown — also when the test failed or raised —
  its repeats stop and every fault it applied is reverted; then it is closed.
- ``@pytest.mark.chaos_experiment("experiment.yml")``: the test body runs while the file's *method* runs in the
  background (a path relative to the test file); its faults are reverted at teardown, whatever the outcome.
- Probes as assertions: ``chaos.assert_steady_state("experiment.yml")`` runs the file's steady-state probes over
  their windows and raises ``AssertionError`` naming what did not hold; ``chaos.assert_probe(rpc={"call":
  "Echo.upper", "args": {"text": "hi"}}, window=2, tolerance={"latency": {"p99": "200ms"}})`` checks one probe;
  ``chaos.check_probe(...)`` returns the verdict instead (truthy when it held).

It works next to lymph's own plugin (``lymph.testing.pytest``): nothing here patches lymph or gevent, and under
gevent the client uses ``zmq.green``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator, List, Optional

import pytest

from .discovery import DEFAULT_CHROOT, zookeeper_hosts
from .experiment import Experiment, MethodRun, Verdict, check_probes, probe
from .scenario import Scenario

#: Used when neither the option nor lymph's configuration names ZooKeeper.
DEFAULT_ZOOKEEPER = "127.0.0.1:2181" + DEFAULT_CHROOT
MARKER = "chaos_experiment"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("lymph-chaos", "lymph-chaos: fault injection for lymph services")
    group.addoption(
        "--lymph-zookeeper",
        dest="lymph_zookeeper",
        default=None,
        metavar="HOSTS",
        help="ZooKeeper of the Chaos agents and services, host:port[/chroot] (default: from lymph's configuration "
        f"$LYMPH_CONFIG or .lymph.yml, else {DEFAULT_ZOOKEEPER})",
    )
    group.addoption(
        "--lymph-chaos-dry-run",
        dest="lymph_chaos_dry_run",
        action="store_true",
        help="ask the agents what they would do; apply no fault",
    )
    group.addoption(
        "--lymph-chaos-timeout",
        dest="lymph_chaos_timeout",
        type=float,
        default=2.0,
        help="seconds to wait for ZooKeeper and for each agent reply (default 2)",
    )


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(path): run the test while the method of a lymph-chaos experiment file runs; "
        "its faults are reverted at teardown",
    )


def zookeeper_from_lymph_config(rootdir: Optional[str] = None) -> Optional[str]:
    """``container.registry.zkclient.hosts`` of ``$LYMPH_CONFIG`` or ``.lymph.yml`` (root dir, then the current
    directory), with lymph's default chroot; ``None`` when there is no such file or key."""
    candidates = [os.environ.get("LYMPH_CONFIG")]
    candidates += [os.path.join(d, ".lymph.yml") for d in (rootdir, os.getcwd()) if d]
    for path in candidates:
        if not path or not os.path.isfile(path):
            continue
        try:
            import yaml

            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except Exception:  # noqa: BLE001 - an unreadable config is no config
            continue
        registry = (data.get("container") or {}).get("registry") or data.get("registry") or {}
        if isinstance(registry, str) and registry.startswith("dep:"):
            registry = (data.get("dependencies") or {}).get(registry[4:]) or {}
        client = registry.get("zkclient") if isinstance(registry, dict) else None
        if isinstance(client, str) and client.startswith("dep:"):
            client = (data.get("dependencies") or {}).get(client[4:]) or {}
        hosts = client.get("hosts") if isinstance(client, dict) else None
        if isinstance(client, dict) and not hosts:
            hosts = "127.0.0.1:2181"
        if isinstance(hosts, str) and hosts and "$(" not in hosts:
            return zookeeper_hosts(hosts)
    return None


@pytest.fixture(scope="session")
def chaos_zookeeper(pytestconfig: Any) -> str:
    """The ZooKeeper hosts string the plugin uses (with chroot)."""
    given = pytestconfig.getoption("lymph_zookeeper")
    if given:
        return zookeeper_hosts(given)
    return zookeeper_from_lymph_config(str(pytestconfig.rootpath)) or DEFAULT_ZOOKEEPER


class TestScenario(Scenario):
    """The ``chaos`` fixture: a :class:`Scenario` for one test, with probes as assertions."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, zookeeper: str, test_dir: str, **options: Any) -> None:
        super().__init__(zookeeper, **options)
        self._test_dir = test_dir

    def _path(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self._test_dir, path)

    def experiment(self, path: str) -> Experiment:
        """Loads an experiment file (relative to the test file)."""
        return Experiment.load(self._path(path))

    def run_method(self, path: str) -> MethodRun:
        """A context manager running an experiment file's method during its block (reverted on exit)."""
        return self.experiment(path).method(self.zookeeper_hosts, dry_run=self.dry_run, timeout=self.timeout)

    def check_steady_state(self, path: str) -> List[Verdict]:
        """The verdicts of the file's steady-state probes, each over its window."""
        return self.experiment(path).check_steady_state(self.zookeeper_hosts, self.timeout)

    def assert_steady_state(self, path: str) -> None:
        """Raises AssertionError unless every steady-state probe of the file holds over its window."""
        self.experiment(path).assert_steady_state(self.zookeeper_hosts, self.timeout)

    def check_probe(self, name: str = "probe", **spec: Any) -> Verdict:
        """Runs one probe (shaped like the file's: ``rpc``/``registry``/``http``, ``every``, ``window``,
        ``timeout``, ``tolerance``) over its window; the verdict is truthy when it held."""
        return check_probes([probe(name, **spec)], self.zookeeper_hosts, self.timeout)[0]

    def assert_probe(self, name: str = "probe", **spec: Any) -> Verdict:
        """Like :meth:`check_probe`; raises AssertionError explaining what did not hold."""
        verdict = self.check_probe(name, **spec)
        if not verdict.held:
            raise AssertionError(verdict.explain())
        return verdict


def _scenario_for(request: Any, zookeeper: str) -> TestScenario:
    config = request.config
    sn = TestScenario(
        zookeeper,
        os.path.dirname(str(request.node.fspath)),
        timeout=config.getoption("lymph_chaos_timeout"),
        dry_run=config.getoption("lymph_chaos_dry_run"),
    )
    # Fault ids name the test (sn-<hash of the node id>-<n>), so an agent's events say which test did what.
    sn.id = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8] + os.urandom(2).hex()
    return sn


@pytest.fixture
def chaos(request: Any, chaos_zookeeper: str) -> Iterator[TestScenario]:
    """A Scenario bound to this test; reverted and closed at teardown, also when the test fails."""
    sn = _scenario_for(request, chaos_zookeeper)
    try:
        yield sn
    finally:
        try:
            sn.cancel()
            sn.revert()
        finally:
            sn.close()


@pytest.fixture(autouse=True)
def _lymph_chaos_experiment(request: Any) -> Iterator[Optional[MethodRun]]:
    """Runs the method of a ``chaos_experiment`` marker's file during the test; reverted at teardown."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        yield None
        return
    if not marker.args:
        raise pytest.UsageError(f"@pytest.mark.{MARKER} needs the experiment file: @pytest.mark.{MARKER}('exp.yml')")
    zookeeper = request.getfixturevalue("chaos_zookeeper")
    path = str(marker.args[0])
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(str(request.node.fspath)), path)
    experiment = Experiment.load(path)
    run = experiment.method(
        zookeeper,
        dry_run=request.config.getoption("lymph_chaos_dry_run") or bool(marker.kwargs.get("dry_run")),
        timeout=request.config.getoption("lymph_chaos_timeout"),
    )
    with run:
        yield run
    if run.errors:
        pytest.fail(f"the method of {path} failed: {run.errors[0]}", pytrace=False)
