"""The client against a real lymph-chaos agent and a real lymph 0.15 ``Echo`` that a supervisor restarts whenever
it dies (the setup of ``tests/tests/zk_python_client.rs``, see conftest.py).

Network faults: the proof that "a network fault is active during the block and gone after it" uses
``inject_latency`` when the agent's kernel has ``sch_netem``, else ``inject(name, 'blackhole')`` (the development
kernel has no netem, so ``inject_latency`` fails there with ``KernelFeatureMissing``; a blackhole needs only the
agent's BPF classifier). Either way the test checks the fault in ``Chaos.faults()`` during the block, its effect on
a real request to Echo, and its absence (plus a ``reverted`` event) after the block.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, List

import pytest

import lymph_chaos
from lymph_chaos import (
    BadArguments,
    ChaosError,
    InvalidArgument,
    KernelFeatureMissing,
    NoAgentError,
    UnknownService,
    ZooKeeperUnavailable,
)

if TYPE_CHECKING:  # pytest loads conftest.py itself; this import is for the type checker only
    from conftest import Env

#: The 2015 snippet's `time.sleep(30)`, shortened: with its `repeat(interval=5)`, three rounds (at 0, 5 and 10 s),
#: each a kill, with time for Echo to restart (~1-2 s) and the agent to see its new pid in between.
SLEEP = 11


def _ids(faults: List[Dict[str, Any]]) -> List[str]:
    return [f["id"] for f in faults]


def _alive(pid: Any) -> bool:
    try:
        return isinstance(pid, int) and _proc_state(pid) not in ("Z", "X")
    except OSError:
        return False


def _echo_endpoint(sn: Any, service: str, timeout: float = 20) -> str:
    """The endpoint of a running instance, once the agent reports it with the pid of a live process.

    (The agent's view lags a restart by up to its refresh interval, about 2 s: until then it may still name the
    killed pid, and a process fault would fail with NotFound.)
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            instances = [i for i in sn.services().get(service) or [] if _alive(i.get("pid"))]
        except ChaosError:
            instances = []
        if instances:
            endpoint: str = instances[0]["endpoint"]
            return endpoint
        if time.monotonic() > deadline:
            raise AssertionError(f"no running {service} instance within {timeout} s")
        time.sleep(0.2)


def _wait_echo_answers(sn: Any, service: str, timeout: float = 20) -> float:
    """Waits until the agent reports a live Echo and it answers a request; returns how long that took."""
    started = time.monotonic()
    while True:
        try:
            endpoint = _echo_endpoint(sn, service, timeout)
            assert sn.rpc.request(endpoint, f"{service}.echo", {"text": "back"}, timeout=1) == "back"
            return time.monotonic() - started
        except ChaosError:
            if time.monotonic() - started > timeout:
                raise
            time.sleep(0.2)


def _network_kind(new_scenario: Callable[..., Any], service: str) -> str:
    """``latency`` when the agent can delay packets (sch_netem), else ``blackhole``."""
    probe = new_scenario()
    probe.inject_latency(service, 0.001, lifetime=2)
    try:
        probe.apply()
    except KernelFeatureMissing as err:
        assert "netem" in err.message.lower(), err
        return "blackhole"
    probe.revert()
    return "latency"


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


#: The snippet of the 2015 README (mouadino/lymph-chaos), verbatim.
README_SNIPPET = """\
from lymph.chaos import Scenario

sn = Scenario.from_zookeeper_host('127.0.0.1')

sn.kill('echo')
sn.inject_latency('demo', 1)

with sn.repeat(interval=5):
    # Here you can put what you want to test while chaos monkey
    # is destroying services.
    import time
    time.sleep(30)
"""


def _adapt(text: str, replacements: Dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_the_2015_snippet_runs_unchanged(env: Env, import_path: str, new_scenario: Callable[..., Any]) -> None:
    """Acceptance 1: the README snippet, run with exec, with only these changes: the import path of this run, the
    ZooKeeper address (our chroot), the network fault line (Echo instead of `demo`; a blackhole when the kernel
    has no netem), the sleep shortened, and a call to record what is active while the block runs.

    `kill('echo')` stays literal: the client and the agent match `Echo` case-insensitively.
    """
    net_kind = _network_kind(new_scenario, env.service)
    _wait_echo_answers(new_scenario(), env.service)
    network_line = (
        f"sn.inject_latency({env.service!r}, 1)"
        if net_kind == "latency"
        else f"sn.inject({env.service!r}, 'blackhole')"
    )
    code = _adapt(
        README_SNIPPET,
        {
            "from lymph.chaos import": f"from {import_path} import",
            "'127.0.0.1'": repr(env.zk_hosts),
            "sn.inject_latency('demo', 1)": network_line,
            "time.sleep(30)\n": f"time.sleep({SLEEP})\n    during_block(sn)\n",
        },
    )
    print(code)
    seen: Dict[str, Any] = {}

    def during_block(sn: Any) -> None:
        seen["faults"] = sn.faults()
        endpoint = _echo_endpoint(sn, env.service)
        started = time.monotonic()
        try:
            sn.rpc.request(endpoint, f"{env.service}.echo", {"text": "x"}, timeout=3 if net_kind == "latency" else 1.5)
            seen["probe"] = ("answered", time.monotonic() - started)
        except ChaosError as err:
            seen["probe"] = (type(err).__name__, time.monotonic() - started)
        seen["counters"] = sn.faults()

    namespace: Dict[str, Any] = {"during_block": during_block}
    started = time.monotonic()
    exec(compile(code, "README snippet", "exec"), namespace)
    block_took = time.monotonic() - started
    sn = namespace["sn"]
    assert isinstance(sn, lymph_chaos.Scenario)

    kill_id, net_id = [a.fault_id for a in sn.actions]
    print(f"block took {block_took:.1f} s; probe during the block: {seen['probe']}; background errors: {sn.errors}")
    # A round may find Echo still restarting from the previous kill; nothing else may go wrong.
    assert all(type(e).__name__ in ("NoAgentForService", "NotFound") for e in sn.errors), sn.errors

    # The network fault was active during the block, and it acted on the real traffic to Echo ...
    mine = [f for f in seen["faults"] if f["id"] == net_id]
    assert len(mine) == 1, seen["faults"]
    assert mine[0]["kind"] == net_kind and mine[0]["state"] == "active" and mine[0]["service"] == env.service
    if net_kind == "latency":
        assert seen["probe"][0] == "answered" and seen["probe"][1] >= 1.0, seen["probe"]
    else:
        assert seen["probe"][0] in ("ChaosTimeout", "ChaosError"), seen["probe"]
        counters = next(f for f in seen["counters"] if f["id"] == net_id)["counters"]
        assert counters["drops"] > 0, counters

    # ... and is gone after it: reverted by the exit of the block, not expired.
    after = sn.faults()
    assert net_id not in _ids(after) and kill_id not in _ids(after), after
    events = sn.events(mine=True)
    # A `warning` (the agent measured no effect, e.g. while Echo restarted) is no step of the fault's life.
    lifecycle = [e["action"] for e in events if e["fault"] == net_id and e["action"] != "warning"]
    assert lifecycle == ["applied", "reverted"], events

    # The kills were recorded for different pids of the restarted Echo.
    kills = [e for e in events if e["fault"] == kill_id and e["action"] == "applied"]
    pids = [pid for e in kills for pid in e["pids"]]
    print(f"kills: {[(round(e['time'] - kills[0]['time'], 2), e['pids'], e['outcome']) for e in kills]}")
    assert len(kills) >= 2 and all(e["outcome"] == "ok" for e in kills), events
    assert len(set(pids)) == len(pids) >= 2, pids

    # Echo comes back (the supervisor restarts it; nothing blocks its traffic any more).
    print(f"Echo answered again {_wait_echo_answers(sn, env.service):.1f} s after the block")
    sn.close()


def test_an_exception_in_the_block_reverts_every_fault_and_propagates(
    env: Env, new_scenario: Callable[..., Any]
) -> None:
    """Acceptance 2: a pause (SIGSTOP) and a network fault, refreshed by a second round, then an exception."""
    _wait_echo_answers(new_scenario(), env.service)
    sn = new_scenario()
    net_id = sn.inject(env.service, "blackhole")
    pause_id = sn.pause(env.service, 30)
    with pytest.raises(RuntimeError, match="boom"):
        with sn.repeat(interval=1) as repeat:
            active = {f["id"]: f for f in sn.faults()}
            assert net_id in active and pause_id in active, active
            paused_pid = active[pause_id]["pids"][0]
            assert _proc_state(paused_pid) == "T"  # stopped
            deadline = time.monotonic() + 10
            while repeat.rounds < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert repeat.rounds >= 2
            raise RuntimeError("boom")
    remaining = sn.faults()
    assert net_id not in _ids(remaining) and pause_id not in _ids(remaining), remaining
    assert _proc_state(paused_pid) != "T"  # resumed (SIGCONT)
    events = sn.events(mine=True)
    for fault_id in (net_id, pause_id):
        actions = [e["action"] for e in events if e["fault"] == fault_id and e["action"] != "warning"]
        assert actions == ["applied", "reverted"], (fault_id, events)
    assert sn.errors == []


def test_unknown_service_is_a_clear_error_and_nothing_is_applied(env: Env, new_scenario: Callable[..., Any]) -> None:
    """Acceptance 3a: an unknown name fails the whole first round before anything is sent."""
    sn = new_scenario()
    sn.kill(env.service)  # routable, but must not run either
    sn.kill("NoSuchService")
    with pytest.raises(UnknownService) as info:
        with sn.repeat(interval=1):
            pytest.fail("the block must not run")
    message = str(info.value)
    assert "NoSuchService" in message and env.service in message and "known services" in message, message
    assert sn.events(mine=True) == []


def test_no_agent_in_an_empty_chroot(env: Env, scenario_cls: Any) -> None:
    """Acceptance 3b: nothing registered there — a clear error, at once."""
    hosts = f"{env.zk_addr}/t-py-empty-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    sn = scenario_cls.from_zookeeper_host(hosts, timeout=2)
    sn.kill(env.service)
    with pytest.raises(NoAgentError, match="no Chaos agent is registered") as info:
        with sn.repeat(interval=1):
            pytest.fail("the block must not run")
    took = time.monotonic() - started
    sn.close()
    assert took < 2 + 1, took
    assert hosts in str(info.value)


def test_no_agent_answers_within_the_timeout(env: Env, scenario_cls: Any) -> None:
    """Acceptance 3c: an agent registered but gone (its znode outlived it) — a clear error within the timeout."""
    from kazoo.client import KazooClient

    chroot = f"/t-py-stale-{uuid.uuid4().hex[:8]}"
    zk = KazooClient(hosts=env.zk_addr)
    zk.start(timeout=5)
    try:
        dead = f"tcp://127.0.0.1:{_closed_port()}"
        zk.create(
            f"{chroot}/services/Chaos/dead", json.dumps({"endpoint": dead}).encode(), ephemeral=True, makepath=True
        )
        started = time.monotonic()
        sn = scenario_cls.from_zookeeper_host(env.zk_addr + chroot, timeout=2)
        sn.kill(env.service)
        with pytest.raises(NoAgentError, match="answered within 2 s") as info:
            sn.apply()
        took = time.monotonic() - started
        sn.close()
        assert 2 <= took < 2 + 1.5, took
        assert dead in str(info.value)
    finally:
        zk.delete(chroot, recursive=True)
        zk.stop()
        zk.close()


def test_unreachable_zookeeper_is_a_clear_error_within_the_timeout(scenario_cls: Any) -> None:
    started = time.monotonic()
    with pytest.raises(ZooKeeperUnavailable, match="cannot connect to ZooKeeper"):
        scenario_cls.from_zookeeper_host("127.0.0.1", port=_closed_port(), timeout=1)
    assert time.monotonic() - started < 1 + 1.5


def test_a_dead_agent_next_to_a_live_one_is_reported_while_the_live_one_acts(
    env: Env, scenario_cls: Any, new_scenario: Callable[..., Any]
) -> None:
    """Multi-agent routing: a stale registration does not stop the live agent from acting, and it is named."""
    from kazoo.client import KazooClient

    from lymph_chaos.errors import PartialFailure

    zk = KazooClient(hosts=env.zk_hosts)
    zk.start(timeout=5)
    dead = f"tcp://127.0.0.1:{_closed_port()}"
    node = f"/services/Chaos/dead-{uuid.uuid4().hex[:8]}"
    try:
        zk.create(node, json.dumps({"endpoint": dead}).encode(), ephemeral=True)
        sn = new_scenario(timeout=1, dry_run=True)
        assert len(sn.agents()) == 2
        sn.kill(env.service)
        with pytest.raises(PartialFailure) as failed:
            sn.apply()
        assert [f["agent"] for f in failed.value.failures] == [dead]
        reports = failed.value.reports
        assert len(reports) == 1 and reports[0]["dry_run"] is True and reports[0]["service"] == env.service
    finally:
        zk.delete(node)
        zk.stop()
        zk.close()


def test_dry_run_reports_and_changes_nothing(env: Env, new_scenario: Callable[..., Any]) -> None:
    _wait_echo_answers(new_scenario(), env.service)
    sn = new_scenario(dry_run=True)
    pid_before = sn.services()[env.service][0]["pid"]
    kill_id = sn.kill("echo")
    net_id = sn.inject(env.service, "blackhole")
    with sn.repeat(interval=1) as repeat:
        time.sleep(1.5)
        assert not set(_ids(sn.faults())) & {kill_id, net_id}
    assert repeat.rounds >= 2
    events = sn.events(mine=True)
    assert {e["action"] for e in events} == {"dry_run"}, events
    assert len([e for e in events if e["fault"] == kill_id]) == repeat.rounds
    assert next(e["pids"] for e in events if e["fault"] == kill_id) == [pid_before]
    assert sn.services()[env.service][0]["pid"] == pid_before
    assert sn.clear() == []  # dry run: lists what it would revert, reverts nothing


def test_agent_errors_carry_the_agents_type_and_message(env: Env, new_scenario: Callable[..., Any]) -> None:
    sn = new_scenario()
    sn.inject(env.service, "warp")
    with pytest.raises(InvalidArgument, match="unknown fault kind `warp`") as info:
        sn.apply()
    assert info.value.type == "ValueError" and info.value.agent and isinstance(info.value, ValueError)

    sn = new_scenario()
    sn.kill(env.service, nmae="typo")
    with pytest.raises(BadArguments, match="unexpected argument `nmae`") as bad:
        sn.apply()
    assert bad.value.type == "TypeError"
    assert not [e for e in sn.events(mine=True) if e["action"] == "applied"]


def test_inject_latency_works_or_says_the_kernel_lacks_netem(env: Env, new_scenario: Callable[..., Any]) -> None:
    sn = new_scenario()
    fault_id = sn.inject_latency(env.service, 0.05, lifetime=5)
    try:
        reports = sn.apply()
    except KernelFeatureMissing as err:
        assert err.type == "KernelFeatureMissing" and "netem" in err.message.lower(), err
        return
    assert reports[0]["id"] == fault_id and reports[0]["kind"] == "latency"
    assert [r["id"] for r in sn.revert()] == [fault_id]


def test_lymph_heartbeats_from_echo_are_answered(env: Env, new_scenario: Callable[..., Any]) -> None:
    """After a request, real lymph peers ping back every second and expect an answer."""
    sn = new_scenario()
    _wait_echo_answers(sn, env.service)
    before = sn.rpc.pings_answered
    deadline = time.monotonic() + 5
    while sn.rpc.pings_answered == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sn.rpc.pings_answered > before


def test_events_and_status_come_from_every_agent(env: Env, new_scenario: Callable[..., Any]) -> None:
    sn = new_scenario()
    status = sn.status()
    assert len(status) == 1 and all(s["zookeeper"]["state"] == "connected" for s in status.values()), status
    events = sn.events(limit=5)
    assert 0 < len(events) <= 5 and all("agent" in e and "seq" in e for e in events)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
