"""The pytest plugin (``lymph_chaos.pytest_plugin``, entry point ``pytest11``), with pytester: each test writes a
small test module, runs pytest on it in a subprocess (as a user's ``pytest`` run would, the plugin loaded through
its entry point), and checks the outcome — and, against the real agent of the test setup (conftest.py), that every
fault the inner tests applied was reverted, also when they failed.

Inner runs use ``-p no:lymph`` like the outer one (lymph 0.15's own plugin cannot load in these venvs, see
conftest.py) and ``-p no:cacheprovider`` (nothing written next to the tests).
"""

from __future__ import annotations

import json
import time
from typing import Any, List

import pytest

from lymph_chaos import ChaosError, RpcNode, ZooKeeperRegistry

BASE_ARGS = ["-p", "no:lymph", "-p", "no:cacheprovider"]


def inner_args(env: Any) -> List[str]:
    return BASE_ARGS + [f"--lymph-zookeeper={env.zk_hosts}", "-v", "-rA"]


@pytest.fixture
def healthy(env: Any) -> Any:
    """Waits until the service has exactly one registered instance and it answers (earlier tests kill it; a killed
    instance stays registered until its ZooKeeper session times out)."""
    registry = ZooKeeperRegistry(env.zk_hosts, 5)
    deadline = time.monotonic() + 40
    try:
        with RpcNode("127.0.0.1") as node:
            while True:
                instances = registry.instances(env.service)
                if len(instances) == 1:
                    try:
                        if node.request(instances[0].endpoint, f"{env.service}.echo", {"text": "up"}, 1) == "up":
                            return env
                    except ChaosError:
                        pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{env.service} not healthy: {instances}")
                time.sleep(0.2)
    finally:
        registry.close()


def assert_reverted(scenario_cls: Any, env: Any, ids: List[str]) -> None:
    """No fault active on any agent, and a `reverted` event for each id."""
    admin = scenario_cls(env.zk_hosts)
    try:
        assert admin.faults() == []
        events = admin.events()
        for fault_id in ids:
            assert any(e.get("fault") == fault_id and e.get("action") == "reverted" for e in events), (
                fault_id,
                events[-10:],
            )
    finally:
        admin.close()


def test_the_plugin_is_loaded_by_its_entry_point(pytester: Any) -> None:
    result = pytester.runpytest_subprocess(*BASE_ARGS, "--help")
    result.stdout.fnmatch_lines(["*--lymph-zookeeper=HOSTS*", "*--lymph-chaos-dry-run*"])
    result = pytester.runpytest_subprocess(*BASE_ARGS, "--markers")
    result.stdout.fnmatch_lines(["*chaos_experiment(path)*"])


def test_zookeeper_comes_from_the_lymph_configuration_unless_given(pytester: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("LYMPH_CONFIG", raising=False)
    pytester.makefile(
        ".yml",
        **{
            ".lymph": "container:\n  registry:\n    class: lymph.discovery.zookeeper:ZookeeperServiceRegistry\n"
            "    zkclient:\n      class: kazoo.client:KazooClient\n      hosts: 10.9.8.7:2181/orders\n"
        },
    )
    pytester.makepyfile("def test_hosts(chaos_zookeeper):\n    assert chaos_zookeeper == '10.9.8.7:2181/orders'\n")
    pytester.runpytest_subprocess(*BASE_ARGS).assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess(*BASE_ARGS, "--lymph-zookeeper=192.0.2.1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*192.0.2.1:2181/lymph*"])


def test_a_malformed_experiment_file_is_an_error_naming_line_and_key(pytester: Any) -> None:
    pytester.makefile(".yml", bad="title: bad\nmethod:\n  - fault: blackhole\n    service: X\n  - pause: soon\n")
    pytester.makepyfile(
        "import pytest\n@pytest.mark.chaos_experiment('bad.yml')\ndef test_never_runs():\n    raise SystemExit(3)\n"
    )
    result = pytester.runpytest_subprocess(*BASE_ARGS, "-rA")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*bad.yml:5: method[[]1[]].pause*soon*"])


def test_a_failing_test_still_has_its_faults_reverted(pytester: Any, env: Any, healthy: Any, scenario_cls: Any) -> None:
    pytester.makepyfile(
        f"""
import json

def test_breaks(chaos):
    chaos.inject({env.service!r}, "blackhole", lifetime=120)
    reports = chaos.apply()
    with open("ids.json", "w") as fh:
        json.dump([r["id"] for r in reports], fh)
    assert [f["kind"] for f in chaos.faults()] == ["blackhole"]
    assert False, "this test fails with its fault active"
"""
    )
    result = pytester.runpytest_subprocess(*inner_args(env))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*this test fails with its fault active*"])
    ids = json.loads((pytester.path / "ids.json").read_text())
    assert ids and all(i.startswith("sn-") for i in ids)
    # The fault had a 120 s lifetime: it is gone because the fixture reverted it.
    assert_reverted(scenario_cls, env, ids)


def test_the_marker_runs_the_method_during_the_test_and_reverts_it(
    pytester: Any, env: Any, healthy: Any, scenario_cls: Any
) -> None:
    pytester.makefile(
        ".yml",
        experiment=f"title: cut {env.service} off\nmethod:\n  - fault: blackhole\n    service: {env.service}\n"
        "  - pause: 60s\n",
    )
    pytester.makepyfile(
        f"""
import json
import pytest

@pytest.mark.chaos_experiment("experiment.yml")
def test_under_the_method(chaos):
    faults = chaos.faults()
    with open("ids.json", "w") as fh:
        json.dump([f["id"] for f in faults], fh)
    assert [f["kind"] for f in faults] == ["blackhole"]
    verdict = chaos.check_probe(
        rpc={{"call": "{env.service}.echo", "args": {{"text": "x"}}}}, every=0.1, window=1, timeout=0.3
    )
    assert not verdict, verdict.explain()
    raise RuntimeError("fails under the method")
"""
    )
    started = time.monotonic()
    result = pytester.runpytest_subprocess(*inner_args(env))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: fails under the method*"])
    assert time.monotonic() - started < 40, "the 60 s pause of the method did not end with the test"
    ids = json.loads((pytester.path / "ids.json").read_text())
    assert len(ids) == 1
    assert_reverted(scenario_cls, env, ids)


def test_steady_state_probes_are_assertions(pytester: Any, env: Any, healthy: Any) -> None:
    pytester.makefile(
        ".yml",
        steady=f"""title: steady
steady_state:
  probes:
    - name: {env.service} answers
      rpc: {{call: {env.service}.upper, args: {{text: hi}}}}
      every: 100ms
      window: 1s
      tolerance: {{success: 100%, reply: {{equals: HI}}, latency: {{p99: 500ms}}}}
    - name: registered
      registry: {{service: {env.service}}}
      every: 200ms
      window: 600ms
method: []
""",
    )
    pytester.makepyfile(
        f"""
import pytest

def test_steady(chaos):
    chaos.assert_steady_state("steady.yml")
    assert all(chaos.check_steady_state("steady.yml"))

def test_a_probe_that_does_not_hold_is_an_assertion_error(chaos):
    with pytest.raises(AssertionError, match="does not match"):
        chaos.assert_probe(
            rpc={{"call": "{env.service}.upper", "args": {{"text": "hi"}}}},
            every=0.1,
            window=0.5,
            tolerance={{"reply": {{"equals": "nope"}}}},
        )
"""
    )
    result = pytester.runpytest_subprocess(*inner_args(env))
    result.assert_outcomes(passed=2)
