"""Tests without ZooKeeper or agents: hosts strings, msgpack frames, errors, routing, and the RPC peer against a
fake lymph peer built from plain pyzmq (replies of every type, heartbeats, timeouts)."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

import lymph_chaos
from lymph_chaos import errors, scenario
from lymph_chaos.codec import pack, unpack
from lymph_chaos.rpc import ACK, ERROR, NACK, REP, REQ, RpcNode, request_frames, zmq_module
from lymph_chaos.scenario import Action, plan, resolve_service


def test_zookeeper_hosts_short_forms() -> None:
    hosts = lymph_chaos.zookeeper_hosts
    assert hosts("127.0.0.1") == "127.0.0.1:2181/lymph"
    assert hosts("127.0.0.1", port=2182) == "127.0.0.1:2182/lymph"
    assert hosts("127.0.0.1", chroot="other") == "127.0.0.1:2181/other"
    assert hosts("127.0.0.1", chroot=None) == "127.0.0.1:2181"
    assert hosts("10.0.0.1:3000") == "10.0.0.1:3000/lymph"
    assert hosts("10.0.0.1:3000/t-x-1") == "10.0.0.1:3000/t-x-1"
    assert hosts("zk1,zk2:2182/x", port=2000) == "zk1:2000,zk2:2182/x"
    assert hosts("zk1/") == "zk1:2181"
    with pytest.raises(ValueError):
        hosts("")


def test_request_frames_are_byte_exact_with_lymph() -> None:
    # A request captured from lymph 0.15 (shared notes, §2.2): Echo.upper(text="raw") with trace id "abc".
    frames = request_frames("ac6c2f914c5f45ccb9e667876dc498f1", "Echo.upper", {"text": "raw"}, trace_id="abc")
    assert frames == [
        b"ac6c2f914c5f45ccb9e667876dc498f1",
        b"REQ",
        b"Echo.upper",
        b"\x82\xa8trace_id\xa3abc\xa7version\xc0",
        b"\x81\xa4text\xa3raw",
    ]


def test_unpack_reads_what_lymph_writes() -> None:
    assert unpack(b"\x82\xa7version\xc0\xa8trace_id\xa3abc") == {"version": None, "trace_id": "abc"}
    assert unpack(b"\xa3RAW") == "RAW"
    # str8, as lymph's CLI writes 32-character trace ids.
    trace = "59b3aa2d3a9c4122a63ff494ff7f7594"
    assert unpack(b"\xd9 " + trace.encode()) == trace
    assert unpack(pack({"pids": [1, 2], "dry_run": True, "x": 1.5, "b": b"\x00"})) == {
        "pids": [1, 2],
        "dry_run": True,
        "x": 1.5,
        "b": b"\x00",
    }
    assert pack(b"\x00")[:1] == b"\xc4"  # bytes as bin, not str


def test_error_replies_become_typed_exceptions() -> None:
    err = errors.error_from_reply("UnknownService", "unknown service `x`", "tcp://127.0.0.1:1")
    assert isinstance(err, lymph_chaos.UnknownService) and isinstance(err, lymph_chaos.ChaosError)
    assert (err.type, err.message, err.agent) == ("UnknownService", "unknown service `x`", "tcp://127.0.0.1:1")
    assert "unknown service `x`" in str(err) and "tcp://127.0.0.1:1" in str(err)
    assert isinstance(errors.error_from_reply("ValueError", "m"), ValueError)
    assert isinstance(errors.error_from_reply("TypeError", "m"), TypeError)
    assert isinstance(errors.error_from_reply("KernelFeatureMissing", "m"), lymph_chaos.KernelFeatureMissing)
    other = errors.error_from_reply("SomethingNew", "m")
    assert type(other) is lymph_chaos.ChaosError and other.type == "SomethingNew"
    assert issubclass(lymph_chaos.ZooKeeperUnavailable, lymph_chaos.NoAgentError)
    assert issubclass(lymph_chaos.ChaosTimeout, TimeoutError)


def test_service_names_resolve_like_the_agent() -> None:
    known = ["Chaos", "Echo", "lymph"]
    assert resolve_service("Echo", known) == "Echo"
    assert resolve_service("echo", known) == "Echo"
    with pytest.raises(lymph_chaos.UnknownService, match="known services: Chaos, Echo, lymph"):
        resolve_service("demo", known)
    with pytest.raises(lymph_chaos.UnknownService, match="ambiguous"):
        resolve_service("echo", ["Echo", "ECHO"])
    assert resolve_service("ECHO", ["Echo", "ECHO"]) == "ECHO"


def _inst(local: bool, n: int = 0) -> Dict[str, Any]:
    return {
        "id": f"i{n}",
        "local": local,
        "pid": 100 + n if local else None,
        "endpoint": f"tcp://10.0.0.{n}:1",
        "hostname": f"h{n}",
    }


A, B, C = "tcp://10.0.0.1:4575", "tcp://10.0.0.2:4575", "tcp://10.0.0.3:4575"
# Every agent sees every registration; `local` only where the instance runs: Echo i1, i2 on A, i3 on B; Demo i4 on B.
VIEW = {
    A: {"Echo": [_inst(True, 1), _inst(True, 2), _inst(False, 3)], "Demo": [_inst(False, 4)]},
    B: {"Echo": [_inst(False, 1), _inst(False, 2), _inst(True, 3)], "Demo": [_inst(True, 4)]},
    C: {"Echo": [_inst(False, 1), _inst(False, 2), _inst(False, 3)], "Demo": [_inst(False, 4)]},
}
HOST_OF = {"i1": A, "i2": A, "i3": B}

# The same vectors as the Rust unit tests of chaos_api::selection (the definition this client follows).


def test_splitmix64_matches_the_reference_outputs() -> None:
    rng = scenario.SplitMix64(1234567)
    assert [rng.next() for _ in range(5)] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    assert scenario.SplitMix64(0).next() == 0xE220A8397B1DCDAF


def test_choose_is_a_seeded_partial_permutation() -> None:
    for seed in range(100):
        for n in range(7):
            for k in range(n + 1):
                chosen = scenario.choose(n, k, seed)
                assert len(chosen) == len(set(chosen)) == k and all(0 <= i < n for i in chosen)
                assert chosen == scenario.choose(n, k, seed)
                assert scenario.choose(n, max(k - 1, 0), seed) == chosen[: max(k - 1, 0)]
    assert len({tuple(scenario.choose(10, 3, seed)) for seed in range(50)}) > 40
    with pytest.raises(ValueError):
        scenario.choose(2, 3, 1)


def test_choose_is_uniform_over_positions() -> None:
    for k, expected in ((1, 4000), (2, 8000)):
        hits = [0] * 5
        for seed in range(20000):
            for i in scenario.choose(5, k, scenario.derive_seed(seed, 99)):
                hits[i] += 1
        assert all(abs(h - expected) < 300 for h in hits), (k, hits)


def test_candidates_are_local_sorted_and_each_instance_once() -> None:
    view = {
        agent: {name: [dict(i) for i in insts] for name, insts in services.items()} for agent, services in VIEW.items()
    }
    view[C]["Echo"][0]["local"] = True  # i1 also listed as local by C: counts once, for A (first by endpoint)
    view[A]["Echo"].append({"local": True})  # no id: cannot be targeted
    view[A]["Echo"].append({"id": "i9", "local": 1})  # `local` counts only when it is true
    assert scenario.candidates(view, "Echo") == [("i1", A), ("i2", A), ("i3", B)]
    assert scenario.candidates(view, "Nope") == []


def test_amounts_are_bounded() -> None:
    def k(n: int, process: bool = True, **params: Any) -> Optional[int]:
        return scenario.instances_to_choose(params, n, process)

    assert (k(4), k(4, False), k(4, all=True), k(4, False, all=True)) == (1, None, 4, None)
    assert (k(4, False, count=3), k(4, count=9), k(4, percent=25), k(4, percent=26)) == (3, 4, 1, 2)
    assert (k(4, percent=0.1), k(4, percent=100), k(4, False, percent=50.0), k(4, all=False)) == (1, 4, 2, 1)
    for bad in ({"count": 0}, {"count": -2}, {"percent": 0}, {"percent": 100.5}, {"percent": float("nan")}):
        with pytest.raises(lymph_chaos.InvalidArgument):
            k(4, **bad)
    for wrong in (
        {"count": 1, "percent": 5},
        {"count": 1, "all": True},
        {"percent": 5, "all": True},
        {"count": 2.0},
        {"count": True},
        {"percent": "5"},
        {"all": 1},
    ):
        with pytest.raises(lymph_chaos.BadArguments):
            k(4, **wrong)


def test_process_faults_hit_one_instance_of_the_cluster_by_default() -> None:
    for seed in range(40):
        targets = plan(Action("kill", "echo", {}, "sn-x-1"), VIEW, seed)
        assert len(targets) == 1
        agent, kwargs = targets[0]
        assert kwargs == {"instance": kwargs["instance"], "id": "sn-x-1"} and agent == HOST_OF[kwargs["instance"]]
        assert targets == plan(Action("kill", "Echo", {}, "sn-x-1"), VIEW, seed), "replayable"


def test_the_default_is_uniform_over_instances_not_hosts() -> None:
    # Echo: i1 and i2 on A, i3 on B: over 6000 seeds each instance ~2000 times (σ ≈ 37), so A ~4000.
    hits: Dict[str, int] = {}
    for seed in range(6000):
        ((_, kwargs),) = plan(Action("pause", "Echo", {"lifetime": 3}, "p"), VIEW, scenario.derive_seed(seed, 1))
        hits[kwargs["instance"]] = hits.get(kwargs["instance"], 0) + 1
    assert sorted(hits) == ["i1", "i2", "i3"] and all(abs(n - 2000) < 200 for n in hits.values()), hits


def test_counts_and_percentages_are_cluster_wide() -> None:
    for seed in range(50):
        targets = plan(Action("kill", "Echo", {"count": 2, "signal": "SIGTERM"}, "i"), VIEW, seed)
        assert [kw["id"] for _, kw in targets] == ["i", "i.1"]
        assert len({kw["instance"] for _, kw in targets}) == 2
        assert all(
            agent == HOST_OF[kw["instance"]] and kw["signal"] == "SIGTERM" and "count" not in kw
            for agent, kw in targets
        )
        # Network kinds select the same way once a count is given.
        net = plan(Action("inject", "Echo", {"kind": "loss", "loss": 5, "count": 2}, "i"), VIEW, seed)
        assert [(a, kw["instance"], kw["id"]) for a, kw in net] == [(a, kw["instance"], kw["id"]) for a, kw in targets]
    assert len(plan(Action("kill", "Echo", {"count": 9}, "i"), VIEW, 1)) == 3
    assert len(plan(Action("terminate", "Echo", {"percent": 50}, "i"), VIEW, 1)) == 2
    every = plan(Action("pause", "Echo", {"all": True, "lifetime": 3}, "i"), VIEW, 1)
    assert sorted((agent, kw["instance"]) for agent, kw in every) == [(A, "i1"), (A, "i2"), (B, "i3")]


def test_network_and_resource_faults_go_to_every_host_with_an_instance() -> None:
    targets = plan(Action("inject", "Echo", {"kind": "blackhole"}, "sn-x-2"), VIEW)
    assert targets == [(a, {"kind": "blackhole", "name": "Echo", "id": "sn-x-2"}) for a in (A, B)]
    assert [t[0] for t in plan(Action("inject", "ECHO", {"kind": "blackhole", "all": True}, "i"), VIEW)] == [A, B]
    assert [t[0] for t in plan(Action("inject", "Echo", {"kind": "cpu"}, "i"), VIEW)] == [A, B]
    assert plan(Action("inject_latency", "demo", {"latency": 1}, "i"), VIEW) == [
        (B, {"latency": 1, "name": "Demo", "id": "i"})
    ]


def test_unroutable_actions_say_why() -> None:
    with pytest.raises(lymph_chaos.UnknownService, match="'nope'"):
        plan(Action("kill", "nope", {}, "i"), VIEW)
    with pytest.raises(lymph_chaos.UnknownService, match="ambiguous"):
        plan(Action("kill", "echo", {}, "i"), dict(VIEW, **{"tcp://x:1": {"ECHO": [_inst(True, 7)]}}))
    no_local = {A: {"Echo": [_inst(False, 1)]}}
    with pytest.raises(lymph_chaos.NoAgentForService, match="no Chaos agent has a running instance"):
        plan(Action("kill", "Echo", {}, "i"), no_local)
    with pytest.raises(lymph_chaos.BadArguments, match="one of count, percent, all"):
        plan(Action("kill", "nope", {"count": 1, "all": True}, "i"), VIEW)  # options are checked first


def test_lasting_faults_keep_their_seed_across_rounds_and_kills_do_not() -> None:
    assert scenario.action_seed(5, 0, 0, False) == scenario.action_seed(5, 0, 9, False)
    assert scenario.action_seed(5, 0, 0, True) != scenario.action_seed(5, 0, 1, True)
    assert scenario.action_seed(5, 0, 0, True) != scenario.action_seed(5, 1, 0, True)
    assert scenario.action_seed(5, 0, 0, True) == scenario.action_seed(5, 0, 0, False)
    kill, pause = Action("kill", "Echo", {}, "k"), Action("pause", "Echo", {"seed": 42}, "p")
    assert scenario.round_seed(5, 0, 3, kill) == scenario.action_seed(5, 0, 3, True)
    assert scenario.round_seed(5, 1, 3, pause) == 42  # the action's own seed wins


def test_queued_actions_get_deterministic_ids() -> None:
    sn = object.__new__(lymph_chaos.Scenario)  # no ZooKeeper needed to queue
    sn.id = "abc"
    sn._lock = threading.RLock()
    sn._actions = []
    assert sn.kill("echo") == "sn-abc-1"
    assert sn.inject_latency("demo", 1) == "sn-abc-2"
    assert sn.pause("echo", 3, id="mine") == "mine"
    assert sn.inject("echo", "loss", loss=10) == "sn-abc-4"
    kinds = [(a.method, a.kind, a.params, a.instant) for a in sn.actions]
    assert kinds == [
        ("kill", "kill", {}, True),
        ("inject_latency", "latency", {"latency": 1}, False),
        ("pause", "pause", {"lifetime": 3}, False),
        ("inject", "loss", {"loss": 10, "kind": "loss"}, False),
    ]


def test_partitions_queue_peer_faults_on_both_sides_or_one() -> None:
    sn = object.__new__(lymph_chaos.Scenario)
    sn.id = "p"
    sn._lock = threading.RLock()
    sn._actions = []
    assert sn.partition("Billing", "Payments") == ["sn-p-1", "sn-p-2"]
    assert sn.partition("Billing", "Payments", "loss", one_way=True, loss=30) == ["sn-p-3"]
    got = [(a.name, a.params) for a in sn.actions]
    assert got == [
        ("Payments", {"kind": "blackhole", "direction": "to", "peer": "Billing"}),
        ("Billing", {"kind": "blackhole", "direction": "to", "peer": "Payments"}),
        ("Payments", {"loss": 30, "kind": "loss", "direction": "to", "peer": "Billing"}),
    ]


def test_a_round_sends_kills_only_after_the_lasting_faults_are_answered() -> None:
    """A kill sent with the round's other faults can end the instance before its agent resolved them."""
    sn = object.__new__(lymph_chaos.Scenario)
    sn.id = "abc"
    sn._lock = threading.RLock()
    sn._actions = []
    sn._applied = {}
    sn._rounds = 0
    sn._unanswered = []
    sn.seed = 1
    sn.dry_run = False
    sn.kill("echo")
    sn.inject_latency("Echo", 1)
    sn.inject("Echo", "blackhole")
    batches: List[List[str]] = []

    def fan_out(calls: Sequence[Tuple[str, str, Dict[str, Any]]]) -> List[Union[Any, errors.ChaosError]]:
        if calls:
            batches.append([method for _, method, _ in calls])
        return [{"id": kwargs["id"], "state": "done" if method == "kill" else "active"} for _, method, kwargs in calls]

    sn._services_view = lambda: VIEW  # type: ignore[method-assign]
    sn._fan_out = fan_out  # type: ignore[method-assign]
    reports = sn._apply_round(None, strict=True)
    assert batches == [["inject_latency", "inject_latency", "inject", "inject"], ["kill"]], batches
    assert sorted(r["id"] for r in reports) == ["sn-abc-1", "sn-abc-2", "sn-abc-2", "sn-abc-3", "sn-abc-3"]


def test_an_agent_that_fails_is_reported_with_its_host_after_the_others_acted() -> None:
    sn = object.__new__(lymph_chaos.Scenario)
    sn.id = "abc"
    sn._lock = threading.RLock()
    sn._actions = []
    sn._applied = {}
    sn._rounds = 0
    sn.errors = []
    sn.seed = 1
    sn.dry_run = False
    sn.inject("Echo", "blackhole")
    down = "tcp://10.0.0.9:4575"

    def services_view() -> Dict[str, Any]:
        sn._unanswered = [{"agent": down, "host": "10.0.0.9", "error": "Timeout: no reply"}]
        return VIEW

    def fan_out(calls: Sequence[Tuple[str, str, Dict[str, Any]]]) -> List[Union[Any, errors.ChaosError]]:
        return [{"id": kwargs["id"], "state": "active"} for _, _, kwargs in calls]

    sn._services_view = services_view  # type: ignore[method-assign]
    sn._fan_out = fan_out  # type: ignore[method-assign]
    with pytest.raises(errors.PartialFailure) as raised:
        sn._apply_round(None, strict=True)
    assert raised.value.failures == [{"agent": down, "host": "10.0.0.9", "error": "Timeout: no reply"}]
    assert sorted(r["host"] for r in raised.value.reports) == sorted(scenario.agent_host(a) for a in (A, B))
    assert "host 10.0.0.9" in str(raised.value)
    # Not strict (a repeat round): recorded, the reports returned.
    assert len(sn._apply_round(None, strict=False)) == 2
    assert [type(e) for e in sn.errors] == [errors.PartialFailure]


def test_an_agents_host_is_the_address_in_its_endpoint() -> None:
    assert scenario.agent_host("tcp://10.77.0.2:4575") == "10.77.0.2"
    assert scenario.agent_host("tcp://[fd00::2]:4575") == "fd00::2"
    assert scenario.agent_host("ipc:///run/x") == "ipc:///run/x"


# -- the RPC peer against a fake lymph peer ------------------------------------------------------------------------


class FakeLymphPeer:
    """A lymph peer from plain pyzmq, as lymph builds one: two ROUTERs with routing id = its endpoint.

    Replies by subject: ``T.rep`` → REP of the kwargs, ``T.error`` → ERROR UnknownService, ``T.nack`` → NACK,
    ``T.ack`` → ACK, ``T.silent`` → nothing. Sends one ``lymph.ping`` back to the first peer that talks to it.
    """

    def __init__(self) -> None:
        zmq = zmq_module()
        self.zmq = zmq
        self.ctx = zmq.Context()
        self.recv = self.ctx.socket(zmq.ROUTER)
        port = _free_port()
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.recv.setsockopt(zmq.IDENTITY, self.endpoint.encode())
        self.recv.bind(self.endpoint)
        self.send = self.ctx.socket(zmq.ROUTER)
        self.send.setsockopt(zmq.IDENTITY, self.endpoint.encode())
        self.send.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ping_replies: List[List[bytes]] = []
        self.requests: List[List[bytes]] = []
        self.ping_id: Optional[bytes] = None
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def _send(self, dest: bytes, frames: List[bytes]) -> None:
        deadline = time.monotonic() + 2
        while True:
            try:
                self.send.send_multipart([dest] + frames, self.zmq.NOBLOCK)
                return
            except self.zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)

    def run(self) -> None:
        poller = self.zmq.Poller()
        poller.register(self.recv, self.zmq.POLLIN)
        connected = set()
        while not self.stop:
            if not dict(poller.poll(20)):
                continue
            frames = self.recv.recv_multipart()
            source, msg_id, kind, subject, headers, body = frames
            if source not in connected:
                self.send.connect(source.decode())
                connected.add(source)
            if kind != REQ:
                if subject == self.ping_id:
                    self.ping_replies.append(frames)
                continue
            self.requests.append(frames)
            name = subject.decode()
            reply_headers = pack({"trace_id": unpack(headers)["trace_id"], "version": None})
            reply = {
                "T.rep": (REP, pack(unpack(body))),
                "T.error": (ERROR, pack({"type": "UnknownService", "message": "unknown service `zz`"})),
                "T.nack": (NACK, pack(None)),
                "T.ack": (ACK, pack(None)),
            }.get(name)
            if reply is not None:
                self._send(source, [b"r" * 32, reply[0], msg_id, reply_headers, reply[1]])
            if self.ping_id is None:
                self.ping_id = b"p" * 32
                ping = [
                    self.ping_id,
                    REQ,
                    b"lymph.ping",
                    pack({"trace_id": None, "version": None}),
                    pack({"payload": "hb"}),
                ]
                self._send(source, ping)

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.recv.close(0)
        self.send.close(0)
        self.ctx.term()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def peer_and_node() -> Iterator[Tuple[FakeLymphPeer, RpcNode]]:
    peer = FakeLymphPeer()
    node = RpcNode("127.0.0.1")
    yield peer, node
    node.close()
    peer.close()


def test_replies_of_every_type(peer_and_node: Tuple[FakeLymphPeer, RpcNode]) -> None:
    peer, node = peer_and_node
    assert node.endpoint.startswith("tcp://127.0.0.1:")
    assert node.request(peer.endpoint, "T.rep", {"a": 1, "s": "x"}) == {"a": 1, "s": "x"}
    assert node.request(peer.endpoint, "T.ack", {}) is None
    with pytest.raises(lymph_chaos.UnknownService) as info:
        node.request(peer.endpoint, "T.error", {})
    assert info.value.message == "unknown service `zz`" and info.value.agent == peer.endpoint
    with pytest.raises(lymph_chaos.Nack):
        node.request(peer.endpoint, "T.nack", {})
    # What went over the wire: our endpoint as routing id, 5 frames, lymph headers.
    source, msg_id, kind, subject, headers, _body = peer.requests[0]
    assert source == node.endpoint.encode() and kind == REQ and subject == b"T.rep" and len(msg_id) == 32
    assert set(unpack(headers)) == {"trace_id", "version"} and unpack(headers)["version"] is None


def test_heartbeats_are_answered_with_their_payload(peer_and_node: Tuple[FakeLymphPeer, RpcNode]) -> None:
    peer, node = peer_and_node
    node.request(peer.endpoint, "T.rep", {})
    deadline = time.monotonic() + 3
    while not peer.ping_replies and time.monotonic() < deadline:
        time.sleep(0.01)
    assert peer.ping_replies, "no reply to lymph.ping"
    source, _, kind, subject, _, body = peer.ping_replies[0]
    assert (source, kind, subject, unpack(body)) == (node.endpoint.encode(), REP, peer.ping_id, "hb")
    assert node.pings_answered == 1


def test_timeouts(peer_and_node: Tuple[FakeLymphPeer, RpcNode]) -> None:
    peer, node = peer_and_node
    started = time.monotonic()
    with pytest.raises(lymph_chaos.ChaosTimeout, match=r"T\.silent"):
        node.request(peer.endpoint, "T.silent", {}, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 1.5
    # Nobody listening there: no handshake, so the message never leaves; same deadline.
    started = time.monotonic()
    with pytest.raises(lymph_chaos.ChaosError):
        node.request(f"tcp://127.0.0.1:{_free_port()}", "T.rep", {}, timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_many_requests_in_parallel(peer_and_node: Tuple[FakeLymphPeer, RpcNode]) -> None:
    peer, node = peer_and_node
    calls = [node.start_request(peer.endpoint, "T.rep", {"n": n}, 3) for n in range(50)]
    assert [c.result() for c in calls] == [{"n": n} for n in range(50)]
