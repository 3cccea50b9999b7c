"""A small lymph RPC peer (ZeroMQ + msgpack), enough to call Chaos agents and answer heartbeats.

lymph's wire protocol (``lymph/core/rpc.py``, ``lymph/core/messages.py``):

- Every peer has two ROUTER sockets whose routing id is its own advertised endpoint ``tcp://ip:port``: one *binds*
  that endpoint (everything incoming, requests and replies, arrives there), the other *connects* to peers
  (everything outgoing leaves there). A peer answers by connecting back to the endpoint named by the first frame
  of the request, so the bound address must be reachable from the agents.
- A message is 5 frames ``[id, type, subject, headers, body]``: ``id`` a fresh ``uuid4().hex``, ``type`` one of
  ``REQ REP ACK NACK ERROR``, ``subject`` ``"Interface.method"`` for requests and the request's id for replies,
  ``headers`` a msgpack map ``{"trace_id", "version"}``, ``body`` msgpack (requests: a map of keyword arguments).
  The receiving ROUTER prepends the sender's routing id, so 6 frames arrive.
- A ROUTER drops messages for a peer whose handshake is not finished; with ``ROUTER_MANDATORY`` the send fails
  with ``EHOSTUNREACH`` instead, and :class:`RpcNode` retries every 2 ms until the message's deadline.
- Peers that talked to us send ``lymph.ping`` requests every second (body ``{"payload": x}``) and expect a ``REP``
  with body ``x``; :class:`RpcNode` answers them on its I/O thread. Any other request gets ``NACK``.

msgpack: :mod:`lymph_chaos.codec` (pure Python, no ``msgpack`` distribution, so installing the client never
replaces lymph's ``msgpack-python`` 0.5): strings are packed as str, bytes as bin, and str is unpacked as text.

Under gevent (``gevent.monkey.patch_all()``, which lymph and its pytest plugin do), the I/O thread is a greenlet
and ``zmq.green`` is used, so nothing blocks the hub.
"""

from __future__ import annotations

import collections
import logging
import socket
import sys
import threading
import time
import uuid
from typing import Any, Deque, Dict, List, Optional, Set

from .codec import pack, unpack
from .errors import ChaosError, ChaosTimeout, Nack, error_from_reply

log = logging.getLogger(__name__)

REQ, REP, ACK, NACK, ERROR = b"REQ", b"REP", b"ACK", b"NACK", b"ERROR"
#: How long a reply (to a ping) may wait for the peer's handshake.
REPLY_DEADLINE = 5.0
#: Poll timeout while nothing waits for a handshake (bounds how long close() takes).
IDLE_POLL_MS = 100
#: Poll timeout while messages wait for a handshake.
RETRY_POLL_MS = 2


def new_id() -> str:
    """A message id: ``uuid4().hex``."""
    return uuid.uuid4().hex


def request_frames(msg_id: str, subject: str, body: Dict[str, Any], trace_id: Optional[str] = None) -> List[bytes]:
    """The 5 frames of a request ``subject(**body)``."""
    headers = {"trace_id": trace_id, "version": None}
    return [msg_id.encode(), REQ, subject.encode(), pack(headers), pack(body)]


def zmq_module() -> Any:
    """pyzmq, or ``zmq.green`` when gevent has monkey-patched ``threading`` (as lymph does)."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        import zmq.green

        return zmq.green
    import zmq

    return zmq


def local_ip_towards(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    try:
        info = socket.getaddrinfo(host, 9, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(info[0][4])
            ip: str = probe.getsockname()[0]
            return ip
    except OSError:
        return "127.0.0.1"


class _Outgoing:
    __slots__ = ("deadline", "dest", "frames", "request_id")

    def __init__(self, dest: str, frames: List[bytes], deadline: float, request_id: Optional[str] = None) -> None:
        self.dest = dest
        self.frames = frames
        self.deadline = deadline
        self.request_id = request_id


class Call:
    """A request in flight; :meth:`result` waits for its reply."""

    def __init__(self, node: RpcNode, endpoint: str, subject: str, msg_id: str, timeout: float) -> None:
        self.node = node
        self.endpoint = endpoint
        self.subject = subject
        self.id = msg_id
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._done = threading.Event()
        self._kind: Optional[bytes] = None
        self._body: bytes = b""
        self._failure: Optional[str] = None

    def _resolve(self, kind: bytes, body: bytes) -> None:
        self._kind, self._body = kind, body
        self._done.set()

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._done.set()

    def done(self) -> bool:
        """Whether a reply (or a failure) arrived."""
        return self._done.is_set()

    def result(self) -> Any:
        """The reply's body.

        Raises:
            ChaosTimeout: no reply before the deadline.
            ChaosError: an ``ERROR`` reply (the subclass named by its ``type``), or the message could not be sent.
            Nack: a ``NACK`` reply.
        """
        if not self._done.wait(max(0.0, self.deadline - time.monotonic())):
            self.node._forget(self.id)
            raise ChaosTimeout(
                f"no reply to {self.subject} from {self.endpoint} within {self.timeout:.3g} s", agent=self.endpoint
            )
        if self._failure is not None:
            raise ChaosError(self._failure, type="Unreachable", agent=self.endpoint)
        if self._kind == REP:
            return unpack(self._body)
        if self._kind == ACK:
            return None
        if self._kind == ERROR:
            try:
                body = unpack(self._body)
            except Exception:  # noqa: BLE001 - a garbled error body is still an error
                body = None
            if isinstance(body, dict):
                raise error_from_reply(
                    str(body.get("type") or "ChaosError"), str(body.get("message", "")), self.endpoint
                )
            raise ChaosError(f"{self.subject} failed with an unreadable ERROR body", type="Error", agent=self.endpoint)
        if self._kind == NACK:
            raise Nack(
                f"{self.subject} was refused (NACK: no such method, bad arguments, or an undeclared error)",
                agent=self.endpoint,
            )
        raise ChaosError(f"unexpected reply type {self._kind!r} to {self.subject}", agent=self.endpoint)


class RpcNode:
    """A lymph peer: a bound ROUTER at :attr:`endpoint`, a connecting ROUTER, and an I/O thread owning both.

    Thread-safe: any thread may call :meth:`request` / :meth:`start_request`.

    Args:
        ip: address to bind and advertise; the agents must be able to connect to it.
        port: port to bind; ``None`` picks a free one.
    """

    def __init__(self, ip: str = "127.0.0.1", port: Optional[int] = None) -> None:
        zmq = zmq_module()
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._recv = self._ctx.socket(zmq.ROUTER)
        self._recv.setsockopt(zmq.LINGER, 0)
        self.endpoint: str = self._bind(ip, port)
        self._send = self._ctx.socket(zmq.ROUTER)
        self._send.setsockopt(zmq.LINGER, 0)
        self._send.setsockopt(zmq.IDENTITY, self.endpoint.encode())
        self._send.setsockopt(zmq.ROUTER_MANDATORY, 1)
        wake_addr = f"inproc://lymph-chaos-wake-{uuid.uuid4().hex}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._outbox: Deque[_Outgoing] = collections.deque()
        self._pending: Dict[str, Call] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        #: Heartbeats (``lymph.ping``) answered so far.
        self.pings_answered = 0
        #: Requests received other than pings (answered with NACK).
        self.requests_refused = 0
        self._thread = threading.Thread(target=self._run, name=f"lymph-chaos-rpc {self.endpoint}", daemon=True)
        self._thread.start()

    def _bind(self, ip: str, port: Optional[int]) -> str:
        zmq = self._zmq
        attempts = 1 if port else 20
        last: Optional[Exception] = None
        for _ in range(attempts):
            chosen = port or _free_port(ip)
            endpoint = f"tcp://{ip}:{chosen}"
            # The routing id must be set before bind: the listener copies the socket's options.
            self._recv.setsockopt(zmq.IDENTITY, endpoint.encode())
            try:
                self._recv.bind(endpoint)
                return endpoint
            except zmq.ZMQError as err:
                last = err
                if err.errno != zmq.EADDRINUSE:
                    break
        self._recv.close(0)
        self._ctx.term()
        raise ChaosError(f"cannot bind a lymph RPC socket on {ip}: {last}", type="BindError")

    # -- client side --------------------------------------------------------------------------------------------

    def start_request(self, endpoint: str, subject: str, body: Dict[str, Any], timeout: float) -> Call:
        """Sends ``subject(**body)`` to the peer at ``endpoint``; returns the :class:`Call` to wait on."""
        if self._closed:
            raise ChaosError("the RPC node is closed", type="Closed")
        msg_id = new_id()
        call = Call(self, endpoint, subject, msg_id, timeout)
        with self._lock:
            self._pending[msg_id] = call
        self._queue(_Outgoing(endpoint, request_frames(msg_id, subject, body, new_id()), call.deadline, msg_id))
        return call

    def request(self, endpoint: str, subject: str, body: Optional[Dict[str, Any]] = None, timeout: float = 2.0) -> Any:
        """Calls ``subject(**body)`` on the peer at ``endpoint`` and returns the reply (see :meth:`Call.result`)."""
        return self.start_request(endpoint, subject, body or {}, timeout).result()

    def close(self) -> None:
        """Stops the I/O thread and closes the sockets; requests still waiting fail."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        for sock in (self._recv, self._send, self._wake_rx, self._wake_tx):
            sock.close(0)
        self._ctx.term()
        with self._lock:
            pending, self._pending = self._pending, {}
        for call in pending.values():
            call._fail("the RPC node was closed")

    def __enter__(self) -> RpcNode:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _forget(self, msg_id: str) -> None:
        with self._lock:
            self._pending.pop(msg_id, None)

    def _queue(self, out: _Outgoing) -> None:
        self._outbox.append(out)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", self._zmq.NOBLOCK)
            except self._zmq.ZMQError:
                pass  # full or closed: the I/O thread is awake anyway, or gone

    # -- I/O thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._recv, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        waiting: List[_Outgoing] = []
        connected: Set[str] = set()
        while not self._stopping:
            try:
                ready = dict(poller.poll(RETRY_POLL_MS if waiting else IDLE_POLL_MS))
            except zmq.ZMQError as err:
                if self._stopping:
                    break
                log.warning("lymph-chaos RPC poll failed: %s", err)
                time.sleep(0.01)
                continue
            if self._stopping:
                break
            if self._wake_rx in ready:
                self._drain(self._wake_rx)
            if self._recv in ready:
                self._receive(waiting)
            while self._outbox:
                waiting.append(self._outbox.popleft())
            if waiting:
                waiting = [out for out in waiting if not self._try_send(out, connected)]

    def _drain(self, sock: Any) -> None:
        zmq = self._zmq
        while True:
            try:
                sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _receive(self, waiting: List[_Outgoing]) -> None:
        zmq = self._zmq
        for _ in range(1000):
            try:
                frames = self._recv.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames, waiting)

    def _handle(self, frames: List[bytes], waiting: List[_Outgoing]) -> None:
        if len(frames) != 6:
            log.debug("dropping a message of %d frames", len(frames))
            return
        source_b, msg_id_b, kind, subject_b, headers_b, body = frames
        try:
            source, msg_id, subject = source_b.decode(), msg_id_b.decode(), subject_b.decode()
        except UnicodeDecodeError:
            log.debug("dropping a message with a non-UTF-8 envelope")
            return
        if kind != REQ:
            with self._lock:
                call = self._pending.pop(subject, None)
            if call is not None:
                call._resolve(kind, body)
            return
        try:
            headers = unpack(headers_b)
        except Exception:  # noqa: BLE001 - answer anyway
            headers = None
        trace_id = headers.get("trace_id") if isinstance(headers, dict) else None
        if subject == "lymph.ping":
            try:
                request = unpack(body)
            except Exception:  # noqa: BLE001
                request = None
            payload = request.get("payload") if isinstance(request, dict) else None
            reply_kind, reply_body = REP, pack(payload)
            self.pings_answered += 1
        else:
            reply_kind, reply_body = NACK, pack(None)
            self.requests_refused += 1
        frames_out = [new_id().encode(), reply_kind, msg_id.encode(), pack({"trace_id": trace_id}), reply_body]
        waiting.append(_Outgoing(source, frames_out, time.monotonic() + REPLY_DEADLINE))

    def _try_send(self, out: _Outgoing, connected: Set[str]) -> bool:
        """Tries to send; True when the message is done with (sent or dropped)."""
        zmq = self._zmq
        if out.dest not in connected:
            try:
                self._send.connect(out.dest)
            except zmq.ZMQError as err:
                self._drop(out, f"cannot connect to {out.dest}: {err}")
                return True
            connected.add(out.dest)
        try:
            self._send.send_multipart([out.dest.encode()] + out.frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as err:
            if err.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN) and time.monotonic() < out.deadline:
                return False
            if err.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self._drop(out, f"could not reach {out.dest} (no ZeroMQ connection before the deadline)")
            else:
                self._drop(out, f"sending to {out.dest} failed: {err}")
            return True

    def _drop(self, out: _Outgoing, reason: str) -> None:
        log.debug("dropping a message to %s: %s", out.dest, reason)
        if out.request_id is None:
            return
        with self._lock:
            call = self._pending.pop(out.request_id, None)
        if call is not None:
            call._fail(reason)


def _free_port(ip: str) -> int:
    """A TCP port that was free on ``ip`` a moment ago."""
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((ip, 0))
        port: int = probe.getsockname()[1]
        return port
