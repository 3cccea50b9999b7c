"""Tests without ZooKeeper or agents: hosts strings, msgpack frames, errors, routing, and the RPC peer against a
fake lymph peer built from plain pyzmq (replies of every type, heartbeats, timeouts)."""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

import lymph_chaos
from lymph_chaos import errors
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
    return {"local": local, "pid": 100 + n if local else None, "endpoint": f"tcp://10.0.0.{n}:1", "hostname": f"h{n}"}


A, B, C = "tcp://10.0.0.1:4575", "tcp://10.0.0.2:4575", "tcp://10.0.0.3:4575"
# Every agent sees every registration; `local` only where the instance runs.
VIEW = {
    A: {"Echo": [_inst(True, 1), _inst(True, 2), _inst(False, 3)], "Demo": [_inst(False, 4)]},
    B: {"Echo": [_inst(False, 1), _inst(False, 2), _inst(True, 3)], "Demo": [_inst(True, 4)]},
    C: {"Echo": [_inst(False, 1), _inst(False, 2), _inst(False, 3)], "Demo": [_inst(False, 4)]},
}


def test_process_faults_hit_one_instance_on_one_host_by_default() -> None:
    seen = set()
    for seed in range(40):
        targets = plan(Action("kill", "echo", {}, "sn-x-1"), VIEW, random.Random(seed))
        assert len(targets) == 1
        agent, kwargs = targets[0]
        assert agent in (A, B) and kwargs == {"name": "Echo", "id": "sn-x-1"}
        seen.add(agent)
    assert seen == {A, B}  # weighted, but both hosts get picked


def test_network_faults_and_all_go_to_every_host_with_an_instance() -> None:
    targets = plan(Action("inject", "Echo", {"kind": "blackhole"}, "sn-x-2"), VIEW)
    assert [t[0] for t in targets] == [A, B]
    assert all(kw == {"kind": "blackhole", "name": "Echo", "id": "sn-x-2"} for _, kw in targets)
    assert [t[0] for t in plan(Action("kill", "Echo", {"all": True}, "i"), VIEW)] == [A, B]
    assert [t[0] for t in plan(Action("pause", "Echo", {"percent": 50, "lifetime": 3}, "i"), VIEW)] == [A, B]
    assert [t[0] for t in plan(Action("inject_latency", "demo", {"latency": 1}, "i"), VIEW)] == [B]


def test_count_is_split_over_hosts() -> None:
    for seed in range(10):
        targets = plan(Action("kill", "Echo", {"count": 2}, "i"), VIEW, random.Random(seed))
        assert sum(kw["count"] for _, kw in targets) == 2
        assert all(kw["count"] <= (2 if agent == A else 1) for agent, kw in targets)
    targets = plan(Action("kill", "Echo", {"count": 9}, "i"), VIEW)
    assert sorted((agent, kw["count"]) for agent, kw in targets) == [(A, 2), (B, 1)]


def test_unroutable_actions_say_why() -> None:
    with pytest.raises(lymph_chaos.UnknownService, match="'nope'"):
        plan(Action("kill", "nope", {}, "i"), VIEW)
    no_local = {A: {"Echo": [_inst(False, 1)]}}
    with pytest.raises(lymph_chaos.NoAgentForService, match="no Chaos agent has a running instance"):
        plan(Action("kill", "Echo", {}, "i"), no_local)


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


def test_a_round_sends_kills_only_after_the_lasting_faults_are_answered() -> None:
    """A kill sent with the round's other faults can end the instance before its agent resolved them."""
    sn = object.__new__(lymph_chaos.Scenario)
    sn.id = "abc"
    sn._lock = threading.RLock()
    sn._actions = []
    sn._applied = {}
    sn._rng = random.Random(1)
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
