"""The client checks itself against ``api.json``: the description of the ``Chaos`` API that the Rust crate
``chaos-api`` generates (a Rust test fails when the checked-in file is stale). Every request the Scenario sends
must be one the agent takes, with parameters it knows; the kind sets the Scenario relies on must be the agent's."""

from __future__ import annotations

import json
import pkgutil
from typing import Any, Dict, List, Set, Tuple

import pytest

import lymph_chaos
from lymph_chaos import discovery, scenario
from lymph_chaos.scenario import INSTANT_KINDS, PROCESS_KINDS, Action, Scenario, plan


def _api() -> Dict[str, Any]:
    data = pkgutil.get_data("lymph_chaos", "api.json")
    assert data is not None, "api.json is not shipped with the package"
    api: Dict[str, Any] = json.loads(data)
    return api


API = _api()
METHODS: Dict[str, Dict[str, Any]] = {m["name"]: m for m in API["methods"]}
#: Method name → its parameter names.
PARAMS: Dict[str, Set[str]] = {m["name"]: {p["name"] for p in m["params"]} for m in API["methods"]}
KINDS: Dict[str, Dict[str, Any]] = {k["name"]: k for k in API["fault_kinds"]}


def test_the_description_ships_with_the_package_and_names_this_version() -> None:
    assert API["version"] == lymph_chaos.__version__
    assert API["service"] == discovery.AGENT_SERVICE


def test_the_kind_sets_are_the_agents() -> None:
    # Process kinds are the kinds that are also methods of their own (kill, terminate, pause).
    assert {name for name, k in KINDS.items() if not k["network"] and name in METHODS} == set(PROCESS_KINDS)
    # Instant kinds end once applied: nothing to revert.
    assert {name for name, k in KINDS.items() if not k["lasting"]} == set(INSTANT_KINDS)


def _view() -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
    def inst(i: str) -> Dict[str, Any]:
        return {"id": i, "endpoint": f"tcp://10.0.0.{len(i)}:4242", "local": True}

    return {
        "tcp://10.0.0.1:4575": {"Echo": [inst("e1"), inst("e2")]},
        "tcp://10.0.0.2:4575": {"Echo": [inst("e3")]},
    }


def _queued(monkeypatch: pytest.MonkeyPatch) -> List[Action]:
    # Queueing needs no registry: the scenario is never applied here.
    monkeypatch.setattr(scenario, "ZooKeeperRegistry", lambda hosts, timeout: None)
    sn = Scenario("127.0.0.1:1/nowhere", seed=7)
    sn.kill("Echo")
    sn.kill("Echo", count=2, signal="SIGTERM", deregister=True, dry_run=True)
    sn.kill("Echo", percent=50)
    sn.kill("Echo", all=True)
    sn.terminate("Echo", count=1)
    sn.pause("Echo", 2.5)
    sn.inject_latency("Echo", 0.2, jitter=0.01, direction="both", lifetime=30)
    sn.inject_latency("Echo", 0.2, count=1)
    inject: List[Tuple[str, Dict[str, Any]]] = [
        ("latency", {"latency": 0.1, "jitter": 0.01, "distribution": "normal"}),
        ("loss", {"loss": 10, "protocol": "tcp"}),
        ("duplicate", {"duplicate": 5}),
        ("corrupt", {"corrupt": 5}),
        ("reorder", {"reorder": 25, "latency": 0.01}),
        ("rate", {"rate": "1mbit"}),
        ("blackhole", {"direction": "to"}),
        ("observe", {}),
        ("cpu", {"workers": 1, "load": 50}),
        ("memory", {"mib": 64}),
        ("disk", {"mib": 16}),
        ("kill", {"signal": 9}),
        ("pause", {"lifetime": 1}),
        ("loss", {"loss": 10, "percent": 50}),
    ]
    for kind, params in inject:
        sn.inject("Echo", kind, **params)
    return sn.actions


def _sent(monkeypatch: pytest.MonkeyPatch) -> List[Tuple[str, Dict[str, Any]]]:
    out = []
    for action in _queued(monkeypatch):
        for _agent, kwargs in plan(action, _view(), seed=11):
            out.append((action.method, kwargs))
    return out


def test_every_request_the_scenario_sends_is_one_the_agent_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _sent(monkeypatch)
    assert len(sent) > 20
    methods_used: Set[str] = set()
    for method, kwargs in sent:
        methods_used.add(method)
        assert method in METHODS, f"the Scenario calls Chaos.{method}, which the agent does not have"
        params = PARAMS[method]
        unknown = set(kwargs) - params
        assert not unknown, f"Chaos.{method} does not take {sorted(unknown)} (it takes {sorted(params)})"
        targets = [key for key in API["targeting"] if key in kwargs]
        assert len(targets) == 1, f"Chaos.{method}({kwargs}) must name exactly one target"
        if method == "inject":
            kind = API["kind_aliases"].get(kwargs["kind"], kwargs["kind"])
            assert kind in KINDS, f"unknown fault kind {kwargs['kind']!r}"
            allowed = set(API["targeting"]) | set(API["common"]) | set(KINDS[kind]["params"]) | {"kind"}
            assert not set(kwargs) - allowed, f"kind {kind} does not take {sorted(set(kwargs) - allowed)}"
            missing = [p for p in KINDS[kind]["required"] if p not in kwargs]
            assert not missing, f"kind {kind} needs {missing}"
    assert {"kill", "terminate", "pause", "inject_latency", "inject"} <= methods_used


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("revert", {"id": "x"}),
        ("faults", {"all": True}),
        ("events", {"since": 0, "limit": 10000}),
        ("status", {}),
        ("clear", {}),
        ("list_services", {}),
    ],
)
def test_the_bookkeeping_calls_are_the_agents(method: str, kwargs: Dict[str, Any]) -> None:
    # The calls Scenario.revert/faults/events/status/clear and agent discovery make (see scenario.py).
    assert method in METHODS
    assert set(kwargs) <= PARAMS[method]
