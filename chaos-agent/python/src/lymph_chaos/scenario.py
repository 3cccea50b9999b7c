"""``Scenario``: queue faults for lymph services, then apply them — once, or again and again while a block runs.

The 2015 lymph-chaos snippet runs unchanged::

    from lymph.chaos import Scenario            # or: from lymph_chaos import Scenario
    sn = Scenario.from_zookeeper_host('127.0.0.1')
    sn.kill('echo')
    sn.inject_latency('demo', 1)
    with sn.repeat(interval=5):
        import time
        time.sleep(30)

How it works:

- Agents are the lymph service ``Chaos`` in ZooKeeper (chroot ``/lymph`` unless told otherwise). Every round asks
  each agent for ``Chaos.list_services`` (service name → instances, ``local`` = on that agent's host) and sends
  each queued action to the agent(s) with a *local* instance of the target service. Names match exactly, or as
  the only case-insensitive match (``'echo'`` finds ``Echo``), as the agents themselves do.
- Which instances an action hits is defined once, in the Rust module docs of ``chaos_api::selection``, and
  :func:`plan` follows it step by step (a test drives both with the same registry views and seeds): process faults
  (kill, terminate, pause) hit one instance of the whole cluster, chosen uniformly over instances, unless
  ``count``, ``percent`` or ``all=True`` (counted cluster-wide) say otherwise; network and resource faults go to
  every host with an instance unless ``count`` or ``percent`` is given. The choice is seeded (:attr:`Scenario.seed`,
  random unless given, logged): the same seed, actions and registry select the same instances.
- Every action has a fixed fault id, ``sn-<scenario id>-<n>``; its k-th chosen instance (k ≥ 1) gets
  ``<id>.<k>``. Sending an id again while that fault is active makes the agent *refresh* it (extend its lifetime)
  instead of adding another, so re-applying every interval is idempotent, and at the end exactly those ids are
  reverted.
- Faults applied by :meth:`Scenario.repeat` without an explicit ``lifetime`` get a short lease (a few intervals)
  that every round renews: if this process dies, the agents end them by themselves soon after.
- An agent that does not answer does not stop the others: a round plans over the agents that answered, sends every
  request, then reports each agent that failed with its host (:class:`PartialFailure`). :meth:`Scenario.events`
  merges every agent's events into one log ordered by time, each with its ``agent`` and ``host``. Both follow the
  Rust client (``chaos_api::scenario``: ``ScenarioError::Partial``, ``merge_events``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Type, Union
from urllib.parse import urlparse

from .discovery import DEFAULT_CHROOT, DEFAULT_PORT, Agent, ZooKeeperRegistry, zookeeper_hosts
from .errors import (
    BadArguments,
    ChaosError,
    InvalidArgument,
    NoAgentError,
    NoAgentForService,
    PartialFailure,
    UnknownFault,
    UnknownService,
)

if TYPE_CHECKING:  # the RPC layer (msgpack, pyzmq) is imported when a scenario first talks to agents
    from .rpc import RpcNode

log = logging.getLogger("lymph_chaos")

#: Fault kinds that act on processes (one instance of the whole cluster by default).
PROCESS_KINDS = frozenset({"kill", "terminate", "pause"})
#: Fault kinds that are over once applied (nothing to revert; they select anew every round).
INSTANT_KINDS = frozenset({"kill", "terminate"})

#: Events asked per ``Chaos.events`` call (the agent's maximum).
EVENTS_PAGE = 10000

#: agent endpoint → service name → instances (what ``Chaos.list_services`` returns, per agent).
ServicesView = Dict[str, Dict[str, List[Dict[str, Any]]]]


@dataclass
class Action:
    """One queued fault: the agent method, the target service and the keyword arguments."""

    #: Agent method: ``kill``, ``terminate``, ``pause``, ``inject_latency`` or ``inject``.
    method: str
    #: Target service name as given (resolved per round).
    name: str
    #: Keyword arguments besides ``name`` and ``id``.
    params: Dict[str, Any] = field(default_factory=dict)
    #: Fault id sent with every application.
    fault_id: str = ""

    @property
    def kind(self) -> str:
        """The fault kind (``kill``, ``pause``, ``latency``, ``blackhole`` …)."""
        if self.method == "inject":
            return str(self.params.get("kind"))
        if self.method == "inject_latency":
            return "latency"
        return self.method

    @property
    def instant(self) -> bool:
        """Whether the fault is over once applied (kills)."""
        return self.kind in INSTANT_KINDS


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def resolve_service(name: str, known: Iterable[str]) -> str:
    """The service ``name`` designates among ``known``: itself, or the only match ignoring ASCII case.

    Raises:
        UnknownService: no match, or several that differ only in case.
    """
    names = sorted(set(known))
    if name in names:
        return name
    matches = [k for k in names if k.translate(_ASCII_LOWER) == name.translate(_ASCII_LOWER)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UnknownService(
            f"service name {name!r} is ambiguous: it matches {', '.join(matches)} (ignoring case); use the exact name"
        )
    raise UnknownService(
        f"unknown service {name!r}: no Chaos agent lists it; known services: {', '.join(names) or 'none'}"
    )


# -- selection: mirrors the Rust module chaos_api::selection, which defines it ----------------------------------

_MASK64 = (1 << 64) - 1
#: SplitMix64's increment: 2^64 / φ, odd.
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


class SplitMix64:
    """The SplitMix64 generator, bit for bit as in Rust (``selection::SplitMix64``)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        """The next 64-bit output."""
        self.state = (self.state + _GOLDEN_GAMMA) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)


def derive_seed(seed: int, salt: int) -> int:
    """The first output of SplitMix64 started at ``seed ^ salt``."""
    return SplitMix64((seed ^ salt) & _MASK64).next()


def action_seed(seed: int, action: int, round_index: int, instant: bool) -> int:
    """The seed action ``action`` (0-based, queue order) selects with in round ``round_index`` of a scenario seeded
    with ``seed``: the round counts only for instant kinds (kills pick anew every round, lasting faults keep theirs)."""
    return derive_seed(derive_seed(seed, action), round_index if instant else 0)


def choose(n: int, k: int, seed: int) -> List[int]:
    """Indices of ``k`` of ``range(n)``: a partial Fisher–Yates shuffle driven by SplitMix64, in drawing order."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n}")
    rng = SplitMix64(seed)
    order = list(range(n))
    for i in range(k):
        j = i + rng.next() % (n - i)
        order[i], order[j] = order[j], order[i]
    return order[:k]


def candidates(view: ServicesView, service: str) -> List[Tuple[str, str]]:
    """(instance id, agent endpoint) of every instance of ``service`` an agent lists as local, sorted, each instance
    once (for the first agent listing it); instances without a string id are left out."""
    pairs = sorted(
        (str(i["id"]), agent)
        for agent, services in view.items()
        for i in (services.get(service) or [])
        if isinstance(i, dict) and i.get("local") is True and isinstance(i.get("id"), str) and i["id"]
    )
    out: List[Tuple[str, str]] = []
    for pair in pairs:
        if not out or out[-1][0] != pair[0]:
            out.append(pair)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def instances_to_choose(params: Dict[str, Any], n: int, process_kind: bool) -> Optional[int]:
    """How many of ``n`` candidates an action with these options hits; ``None``: one request per hosting agent
    (network and resource kinds without ``count`` or ``percent``).

    Raises:
        BadArguments: more than one of ``count``, ``percent``, ``all``, or one of the wrong type.
        InvalidArgument: ``count`` below 1, ``percent`` outside (0, 100].
    """
    count, percent, every = (params.get(key) for key in ("count", "percent", "all"))
    if count is not None and not _is_int(count):
        raise BadArguments("count must be an integer")
    if percent is not None and not (_is_int(percent) or isinstance(percent, float)):
        raise BadArguments("percent must be a number")
    if every is not None and not isinstance(every, bool):
        raise BadArguments("all must be true or false")
    if sum((count is not None, percent is not None, every is True)) > 1:
        raise BadArguments("give one of count, percent, all")
    if count is not None:
        if count < 1:
            raise InvalidArgument(f"count must be at least 1, got {count}")
        return min(int(count), n)
    if percent is not None:
        if not 0 < percent <= 100:
            raise InvalidArgument(f"percent must be in (0, 100], got {percent}")
        return max(min(n, 1), min(math.ceil(n * float(percent) / 100.0), n))
    if not process_kind:
        return None
    return n if every else min(n, 1)


def fault_id(base: str, k: int) -> str:
    """The fault id of an action's k-th chosen instance (0-based): the action's own id, then ``<id>.<k>``."""
    return base if k == 0 else f"{base}.{k}"


def plan(action: Action, view: ServicesView, seed: Optional[int] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """Where to send ``action`` given every agent's services: a list of (agent endpoint, keyword arguments).

    Follows the selection defined in the Rust module docs of ``chaos_api::selection`` (``chaos_api::scenario::plan``
    gives the same answer for the same inputs): ``seed`` (64 bits; random when ``None``) drives the choice.

    Raises:
        BadArguments, InvalidArgument: invalid ``count``, ``percent`` or ``all``.
        UnknownService: no agent lists the service.
        NoAgentForService: agents list it, but none has an instance on its own host.
    """
    if seed is None:
        seed = random.getrandbits(64)
    known: Set[str] = set()
    for services in view.values():
        if isinstance(services, dict):
            known.update(services)
    # Options are checked first: they are wrong whatever the registry holds.
    instances_to_choose(action.params, 1, action.kind in PROCESS_KINDS)
    service = resolve_service(action.name, known)
    found = candidates(view, service)
    if not found:
        instances = [i for services in view.values() for i in services.get(service) or [] if isinstance(i, dict)]
        hosts = sorted({str(i.get("hostname") or i.get("ip") or i.get("endpoint")) for i in instances})
        raise NoAgentForService(
            f"service {service} is registered ({len(instances)} instance record(s), on: {', '.join(hosts) or '?'}) "
            f"but no Chaos agent has a running instance of it on its own host (agents: {', '.join(sorted(view))})"
        )
    k = instances_to_choose(action.params, len(found), action.kind in PROCESS_KINDS)
    if k is None:
        kwargs = dict(action.params, name=service, id=action.fault_id)
        return [(agent, dict(kwargs)) for agent in sorted({agent for _, agent in found})]
    targets = []
    for slot, index in enumerate(choose(len(found), k, seed)):
        instance, agent = found[index]
        kwargs = {key: value for key, value in action.params.items() if key not in ("count", "percent", "all")}
        kwargs.update(instance=instance, id=fault_id(action.fault_id, slot))
        targets.append((agent, kwargs))
    return targets


def round_seed(seed: int, index: int, round_index: int, action: Action) -> int:
    """The seed action number ``index`` (queue order) selects with in round ``round_index``: its own ``seed``
    option, else :func:`action_seed` from the scenario's seed."""
    own = action.params.get("seed")
    if isinstance(own, int) and not isinstance(own, bool) and 0 <= own <= _MASK64:
        return own
    return action_seed(seed, index, round_index, action.instant)


class Scenario:
    """Faults for lymph services, applied by the Chaos agents found in ZooKeeper.

    Queue actions with :meth:`kill`, :meth:`terminate`, :meth:`pause`, :meth:`inject_latency` and
    :meth:`inject`; apply them with :meth:`repeat` (a context manager) or once with :meth:`apply`.

    Args:
        zookeeper: kazoo hosts string with chroot, e.g. ``"127.0.0.1:2181/lymph"`` (see
            :meth:`from_zookeeper_host` for the short forms).
        timeout: seconds to wait for ZooKeeper and for every agent reply.
        dry_run: ask the agents only to report what they would do (also settable later as :attr:`dry_run`).
        ip: address to receive replies on; agents connect back to it. Default: ``$LYMPH_NODE_IP``, else the local
            address that routes to the first agent (loopback when the agents are local).
        port: port for replies (default: a free one).
        seed: the seed instances are selected with (an integer in [0, 2^64)); default: a random one, logged when the
            scenario first applies and kept in :attr:`seed`, so a run can be replayed.

    Raises:
        ZooKeeperUnavailable: ZooKeeper cannot be reached within ``timeout``.
    """

    def __init__(
        self,
        zookeeper: str = "127.0.0.1:2181" + DEFAULT_CHROOT,
        timeout: float = 2.0,
        dry_run: bool = False,
        ip: Optional[str] = None,
        port: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> None:
        if seed is not None and not (_is_int(seed) and 0 <= seed <= _MASK64):
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        #: The seed instances are selected with (see :func:`plan`); the same seed replays the same choices.
        self.seed: int = random.getrandbits(64) if seed is None else int(seed)
        #: Seconds to wait for ZooKeeper and for each agent reply.
        self.timeout: float = float(timeout)
        #: When true, every fault request is a dry run (agents report, never act).
        self.dry_run: bool = bool(dry_run)
        #: This scenario's id: fault ids are ``sn-<id>-<n>``.
        self.id: str = uuid.uuid4().hex[:16]
        #: The kazoo hosts string.
        self.zookeeper_hosts: str = zookeeper
        #: Errors of background rounds (they do not stop :meth:`repeat`); also logged.
        self.errors: List[ChaosError] = []
        self._ip = ip
        self._port = port
        self._node: Optional[RpcNode] = None
        self._lock = threading.RLock()
        self._actions: List[Action] = []
        self._applied: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._repeat: Optional[Repeat] = None
        self._rounds = 0
        # Agents that did not answer the last listing (see _services_view).
        self._unanswered: List[Dict[str, str]] = []
        self._closed = False
        self._registry = ZooKeeperRegistry(zookeeper, self.timeout)

    @classmethod
    def from_zookeeper_host(
        cls,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        chroot: Optional[str] = DEFAULT_CHROOT,
        timeout: float = 2.0,
        **options: Any,
    ) -> Scenario:
        """A scenario using the agents registered in the ZooKeeper at ``host``.

        ``host`` is a host (``'127.0.0.1'``), ``'host:port'``, a comma-separated list of those, optionally ending
        with ``/chroot`` (``'127.0.0.1:2181/lymph'``), which wins over ``chroot``. Other keyword arguments go to
        :class:`Scenario` (``dry_run``, ``ip``, ``port``, ``seed``).
        """
        if "zookeeper" in options:
            raise TypeError("from_zookeeper_host() takes host, not zookeeper")
        return cls(zookeeper_hosts(host, port, chroot), timeout=timeout, **options)

    # -- queueing -----------------------------------------------------------------------------------------------

    def kill(self, name: str, **opts: Any) -> str:
        """Queues killing instances of service ``name``; returns the fault id.

        Options (see the agent's ``Chaos.kill``): ``signal`` (default ``"SIGKILL"``), ``count``, ``percent``,
        ``all`` (default: one instance of the whole cluster; all three count cluster-wide), ``seed`` (this action's
        selection seed instead of one derived from :attr:`seed`), ``deregister``, ``dry_run``, ``id``.
        """
        return self._queue("kill", name, opts)

    def terminate(self, name: str, **opts: Any) -> str:
        """Queues SIGTERM (then SIGKILL after the agent's grace period) for instances of ``name``."""
        return self._queue("terminate", name, opts)

    def pause(self, name: str, seconds: float, **opts: Any) -> str:
        """Queues stopping (SIGSTOP) instances of ``name`` for ``seconds``; the agent resumes them (SIGCONT)."""
        return self._queue("pause", name, dict(opts, lifetime=seconds))

    def inject_latency(self, name: str, seconds: float = 1, **opts: Any) -> str:
        """Queues delaying packets to ``name``'s ports by ``seconds``.

        Options: ``jitter`` (seconds), ``direction`` (``"to"``, ``"from"``, ``"both"``), ``lifetime``,
        ``dry_run``, ``id``. Needs ``sch_netem`` on the agents' hosts (else :class:`KernelFeatureMissing`).
        """
        return self._queue("inject_latency", name, dict(opts, latency=seconds))

    def inject(self, name: str, kind: str, **params: Any) -> str:
        """Queues a fault of ``kind`` for service ``name``; returns the fault id.

        Kinds: ``latency`` (``latency=`` seconds), ``loss`` (``loss=`` %), ``duplicate``, ``corrupt``, ``reorder``
        (percentages), ``rate`` (``rate="1mbit"``), ``blackhole``, ``cpu``, ``memory``, ``disk``, ``kill``,
        ``terminate``, ``pause``; plus ``lifetime``, ``direction``, ``dry_run``, ``id`` (see ``Chaos.inject``).
        """
        return self._queue("inject", name, dict(params, kind=kind))

    def partition(self, a: str, b: str, kind: str = "blackhole", one_way: bool = False, **params: Any) -> List[str]:
        """Queues a network partition between services ``a`` and ``b``; returns the fault ids.

        Symmetric (default): every packet ``a`` sends to ``b``'s endpoint and every packet ``b`` sends to ``a``'s
        (two peer faults, ``inject(b, kind, peer=a)`` and ``inject(a, kind, peer=b)``, direction ``to``); with
        ``one_way=True`` only the packets from ``a`` to ``b``. Everything else both services send or receive is
        untouched. ``kind`` is any network kind (``blackhole``, ``loss`` with ``loss=``, ``latency`` …).

        lymph replies travel on the connection the replying side opens to the caller's endpoint, so ``a``'s
        packets to ``b`` carry ``a``'s requests to ``b`` *and* its replies to ``b``'s calls: a one-way blackhole
        from ``a`` to ``b`` makes calls fail in both directions (``b``'s requests arrive, ``a``'s replies do not).
        """
        if one_way and "direction" in params:
            raise TypeError("partition(): direction is implied (packets from a to b)")
        if "id" in params:
            raise TypeError("partition(): queues two faults; ids are derived from the scenario's")
        opts = dict(params, kind=kind, direction="to")
        ids = [self._queue("inject", b, dict(opts, peer=a))]
        if not one_way:
            ids.append(self._queue("inject", a, dict(opts, peer=b)))
        return ids

    def _queue(self, method: str, name: str, params: Dict[str, Any]) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{method}(): the service name must be a non-empty string, got {name!r}")
        with self._lock:
            fault_id = str(params.pop("id", None) or f"sn-{self.id}-{len(self._actions) + 1}")
            self._actions.append(Action(method, name, params, fault_id))
        return fault_id

    @property
    def actions(self) -> List[Action]:
        """The queued actions, in order."""
        with self._lock:
            return list(self._actions)

    # -- applying -----------------------------------------------------------------------------------------------

    def repeat(self, interval: float = 5, lease: Optional[float] = None) -> Repeat:
        """A context manager applying the queued actions now and every ``interval`` seconds while its block runs.

        On exit, normal or by an exception (which propagates), it stops re-applying and reverts every fault it
        created (network, pause and resource faults, by id; kills need nothing). Faults without an explicit
        ``lifetime`` get ``lease`` seconds (default ``2 × interval + 2 × timeout``, at least 5), renewed every
        round.

        Entering raises (after reverting what it applied) when the first round fails: an unknown service,
        no agent reachable, or an agent error. Errors of later rounds are logged and kept in :attr:`errors`.
        """
        return Repeat(self, interval, lease)

    def apply(self, lease: Optional[float] = None) -> List[Dict[str, Any]]:
        """Applies every queued action once; returns the agents' reports (each with an ``agent`` key).

        Faults without ``lifetime`` get ``lease`` seconds when given, else the agents' default lifetime.

        Raises:
            UnknownService, NoAgentForService: before anything is sent, when an action cannot be routed.
            NoAgentError: no agent registered, or none answered.
            PartialFailure: some agents failed (each with its host in ``failures``) while the others acted (their
                reports in ``reports``).
            ChaosError: the only agent asked failed.
        """
        return self._apply_round(lease, strict=True)

    def revert(self) -> List[Dict[str, Any]]:
        """Reverts every fault this scenario applied that is still active; returns the agents' reports.

        Raises:
            ChaosError: the first failure (after trying every fault; the failed ones stay for the next call);
                faults already over are not errors.
        """
        with self._lock:
            applied, self._applied = self._applied, {}
        if not applied:
            return []
        keys = list(applied)
        results = self._fan_out([(agent, "revert", {"id": fault_id}) for agent, fault_id in keys])
        reports, failures = [], []
        for key, result in zip(keys, results):
            if isinstance(result, UnknownFault):
                continue  # expired or reverted already
            if isinstance(result, ChaosError):
                failures.append(result)
                with self._lock:
                    self._applied.setdefault(key, applied[key])  # a later revert() tries again
                continue
            reports.append(_with_agent(result, key[0]))
        if failures:
            for err in failures[1:]:
                self._record_error(err)
            raise failures[0]
        return reports

    def _apply_round(self, lease: Optional[float], strict: bool) -> List[Dict[str, Any]]:
        actions = self.actions
        if not actions:
            return []
        view = self._services_view()
        with self._lock:
            unanswered = list(self._unanswered)
            round_index, self._rounds = self._rounds, self._rounds + 1
        if round_index == 0:
            log.info(
                "lymph-chaos scenario %s selects instances with seed %d (Scenario(seed=...) replays it)",
                self.id,
                self.seed,
            )
        routed: List[Tuple[Action, List[Tuple[str, Dict[str, Any]]]]] = []
        for index, action in enumerate(actions):
            try:
                routed.append((action, plan(action, view, round_seed(self.seed, index, round_index, action))))
            except ChaosError as err:
                if strict:
                    raise
                self._record_error(err)
        calls: List[Tuple[Action, str, Dict[str, Any]]] = []
        for action, targets in routed:
            for agent, kwargs in targets:
                if lease is not None and not action.instant and kwargs.get("lifetime") is None:
                    kwargs["lifetime"] = lease
                if self.dry_run:
                    kwargs["dry_run"] = True
                calls.append((action, agent, kwargs))
        # Lasting faults go out first and kills only once they are answered: a kill sent at the same time could end
        # the instance before its agent resolved the other faults of the round (a dead instance is no local target).
        calls.sort(key=lambda call: call[0].instant)
        results = self._send_in_phases(calls)
        reports: List[Dict[str, Any]] = []
        errors: List[ChaosError] = []
        failures = list(unanswered)
        for (action, agent, _), result in zip(calls, results):
            if isinstance(result, ChaosError):
                errors.append(result)
                failures.append(_failure(agent, result))
                continue
            report = _with_agent(result, agent)
            reports.append(report)
            if report.get("state") == "active" and not report.get("dry_run"):
                with self._lock:
                    self._applied[(agent, str(report.get("id") or action.fault_id))] = report
        if failures:
            # The only agent asked failed: its own error; else which hosts failed, next to what the others did.
            only: ChaosError = (
                errors[0] if not unanswered and len(errors) == 1 and not reports else PartialFailure(failures, reports)
            )
            if strict:
                raise only
            self._record_error(only)
        return reports

    def _record_error(self, err: ChaosError) -> None:
        log.warning("lymph-chaos scenario %s: %s", self.id, err)
        with self._lock:
            self.errors.append(err)

    # -- inspecting ---------------------------------------------------------------------------------------------

    def agents(self) -> List[Agent]:
        """The Chaos agents registered in ZooKeeper.

        Raises:
            NoAgentError: none is registered.
        """
        agents = self._registry.agents()
        if not agents:
            where = "nothing under /services/Chaos"
            if not self._registry.root_exists():
                where = "its chroot does not even exist: no lymph service ever registered there; check the chroot"
            raise NoAgentError(
                f"no Chaos agent is registered in ZooKeeper at {self.zookeeper_hosts} ({where}); "
                f"start `lymph-chaos agent --zookeeper {self.zookeeper_hosts}` on the hosts of the services"
            )
        return agents

    def services(self) -> Dict[str, List[Dict[str, Any]]]:
        """Service name → the instances agents report on their own hosts (each with an ``agent`` key).

        Services registered without a local instance on any agent's host map to an empty list.
        """
        view = self._services_view()
        out: Dict[str, List[Dict[str, Any]]] = {}
        for agent in sorted(view):
            for name, instances in view[agent].items():
                local = [_with_agent(i, agent) for i in instances or [] if isinstance(i, dict) and i.get("local")]
                out.setdefault(name, []).extend(local)
        return out

    def faults(self, all: bool = False) -> List[Dict[str, Any]]:
        """Active faults on every agent; ``all=True`` adds finished ones.

        Network faults carry live ``counters`` and ``observed``: the effect the agent measured with TCP handshakes
        after applying them (``verdict``: pending, observed, not_observed, no_listener, not_measured;
        ``loss_percent``, ``added_delay_ms``, ``matched_packets``, ``summary``).
        """
        return self._from_every_agent("faults", {"all": bool(all)})

    def events(self, since: float = 0.0, limit: Optional[int] = None, mine: bool = False) -> List[Dict[str, Any]]:
        """Events of every agent (applied, reverted, expired, refused, warning, dry_run …) in one log ordered by
        time, oldest first, each with its ``agent`` (endpoint) and ``host``.

        A network fault's ``applied`` event carries the measured effect in ``detail["observed"]``; a ``warning``
        event follows when the effect was not seen (no packet matched, no loss or delay, nothing listening).

        Args:
            since: only events at or after this Unix time.
            limit: only the last ``limit`` events.
            mine: only events of this scenario's faults.

        Raises:
            NoAgentError: no agent answered.
            PartialFailure: some agents did not answer (``failures``); the others' events, filtered, in ``reports``.
        """
        failures: List[Dict[str, str]] = []
        events = self._all_events(failures)
        prefix = f"sn-{self.id}-"
        own = {a.fault_id for a in self.actions}
        # An action's k-th chosen instance has the fault id <action id>.<k>.
        own_prefixes = tuple(f"{fault}." for fault in own)
        events = [
            e
            for e in events
            if float(e.get("time") or 0) >= since
            and (not mine or str(e.get("fault") or "").startswith((prefix,) + own_prefixes) or e.get("fault") in own)
        ]
        events.sort(key=lambda e: (float(e.get("time") or 0), str(e.get("agent")), int(e.get("seq") or 0)))
        events = events[-limit:] if limit else events
        if failures:
            raise PartialFailure(failures, events)
        return events

    def _all_events(self, unanswered: List[Dict[str, str]]) -> List[Dict[str, Any]]:
        """Every event of every agent: pages of ``EVENTS_PAGE`` (``Chaos.events`` returns the oldest first); agents
        that failed are added to ``unanswered``."""
        agents = self.agents()
        self._rpc_node(agents)
        since = {a.endpoint: 0 for a in agents}
        out: List[Dict[str, Any]] = []
        failures: List[ChaosError] = []
        while since:
            asked = list(since.items())
            results = self._fan_out([(ep, "events", {"since": seq, "limit": EVENTS_PAGE}) for ep, seq in asked])
            for (endpoint, previous), result in zip(asked, results):
                page = [] if isinstance(result, ChaosError) else list(result or [])
                if isinstance(result, ChaosError):
                    failures.append(result)
                    unanswered.append(_failure(endpoint, result))
                out.extend(_with_agent(e, endpoint) for e in page)
                last = max((int(e.get("seq") or 0) for e in page), default=0)
                if len(page) < EVENTS_PAGE or last <= previous:
                    del since[endpoint]
                else:
                    since[endpoint] = last
        if failures and len(failures) == len(agents):
            raise NoAgentError("no Chaos agent answered Chaos.events: " + "; ".join(str(f) for f in failures))
        return out

    def status(self) -> Dict[str, Any]:
        """Agent endpoint → its ``Chaos.status`` (or the error raised asking it)."""
        agents = self.agents()
        results = self._fan_out([(a.endpoint, "status", {}) for a in agents])
        return {a.endpoint: r for a, r in zip(agents, results)}

    def clear(self) -> List[Dict[str, Any]]:
        """Reverts every active fault on every agent, whoever created it; returns their reports.

        In dry-run mode nothing is reverted: returns the faults that would be.
        """
        if self.dry_run:
            return self.faults()
        reports = self._from_every_agent("clear", {})
        with self._lock:
            self._applied.clear()
        return reports

    # -- 2015 API -----------------------------------------------------------------------------------------------

    def play(self, interval: float = 1) -> Repeat:
        """Starts repeating in the background without a ``with`` block; :meth:`cancel` stops and reverts."""
        repeat = Repeat(self, interval, None)
        repeat.__enter__()
        return repeat

    def cancel(self) -> None:
        """Stops what :meth:`play` (or an open :meth:`repeat`) started and reverts its faults."""
        repeat = self._repeat
        if repeat is not None:
            repeat.__exit__(None, None, None)

    # -- plumbing -----------------------------------------------------------------------------------------------

    @property
    def rpc(self) -> RpcNode:
        """The lymph RPC peer this scenario talks through (created on first use)."""
        return self._rpc_node(None)

    def _rpc_node(self, agents: Optional[Sequence[Agent]]) -> RpcNode:
        with self._lock:
            if self._closed:
                raise ChaosError("the scenario is closed", type="Closed")
            if self._node is None:
                from .rpc import RpcNode, local_ip_towards

                ip = self._ip or os.environ.get("LYMPH_NODE_IP")
                if not ip:
                    first = urlparse(agents[0].endpoint).hostname if agents else None
                    ip = local_ip_towards(first) if first else "127.0.0.1"
                self._node = RpcNode(ip, self._port)
            return self._node

    def _send_in_phases(self, calls: Sequence[Tuple[Action, str, Dict[str, Any]]]) -> List[Union[Any, ChaosError]]:
        """Sends the lasting faults of a round at once, then the instant ones (kills) at once; replies in order."""
        lasting = [(agent, action.method, kwargs) for action, agent, kwargs in calls if not action.instant]
        instant = [(agent, action.method, kwargs) for action, agent, kwargs in calls if action.instant]
        return self._fan_out(lasting) + self._fan_out(instant)

    def _fan_out(self, calls: Sequence[Tuple[str, str, Dict[str, Any]]]) -> List[Union[Any, ChaosError]]:
        """Sends every (agent, method, kwargs) at once; returns each reply or the ChaosError it raised."""
        if not calls:
            return []
        node = self._rpc_node(None)
        pending = [
            node.start_request(agent, f"Chaos.{method}", kwargs, self.timeout) for agent, method, kwargs in calls
        ]
        results: List[Union[Any, ChaosError]] = []
        for call in pending:
            try:
                results.append(call.result())
            except ChaosError as err:
                results.append(err)
        return results

    def _services_view(self) -> ServicesView:
        """Every answering agent's ``Chaos.list_services``; the agents that did not answer go to ``_unanswered``."""
        agents = self.agents()
        self._rpc_node(agents)
        results = self._fan_out([(a.endpoint, "list_services", {}) for a in agents])
        view: ServicesView = {}
        failures = []
        for agent, result in zip(agents, results):
            if isinstance(result, ChaosError):
                failures.append(result)
            elif isinstance(result, dict):
                view[agent.endpoint] = result
            else:
                failures.append(ChaosError(f"list_services returned {type(result).__name__}", agent=agent.endpoint))
        with self._lock:
            self._unanswered = [_failure(f.agent or "", f) for f in failures]
        if not view:
            raise NoAgentError(
                f"none of the {len(agents)} Chaos agent(s) registered in ZooKeeper at {self.zookeeper_hosts} answered "
                f"within {self.timeout:g} s: " + "; ".join(str(f) for f in failures)
            )
        for failure in failures:
            log.warning(
                "lymph-chaos: host %s did not answer, its instances are left out of this round: %s",
                agent_host(failure.agent or ""),
                failure,
            )
        return view

    def _from_every_agent(self, method: str, kwargs: Dict[str, Any]) -> List[Dict[str, Any]]:
        agents = self.agents()
        self._rpc_node(agents)
        results = self._fan_out([(a.endpoint, method, dict(kwargs)) for a in agents])
        out: List[Dict[str, Any]] = []
        failures = []
        for agent, result in zip(agents, results):
            if isinstance(result, ChaosError):
                failures.append(result)
                continue
            out.extend(_with_agent(item, agent.endpoint) for item in result or [])
        if failures and len(failures) == len(agents):
            raise NoAgentError(
                f"none of the {len(agents)} Chaos agent(s) answered Chaos.{method}: "
                + "; ".join(str(f) for f in failures)
            )
        for failure in failures:
            log.warning("lymph-chaos: Chaos.%s failed on one agent: %s", method, failure)
        return out

    def close(self) -> None:
        """Stops repeating (reverting), then closes the RPC peer and the ZooKeeper session."""
        if self._closed:
            return
        try:
            self.cancel()
        finally:
            with self._lock:
                self._closed = True
                node, self._node = self._node, None
            if node is not None:
                node.close()
            self._registry.close()

    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Scenario {self.id} {self.zookeeper_hosts} actions={len(self._actions)} dry_run={self.dry_run} "
            f"seed={self.seed}>"
        )


class Repeat:
    """What :meth:`Scenario.repeat` returns: applies the scenario now and every ``interval`` seconds until exit."""

    def __init__(self, scenario: Scenario, interval: float, lease: Optional[float] = None) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be above 0 seconds, got {interval}")
        self.scenario = scenario
        #: Seconds between two rounds (start to start).
        self.interval = float(interval)
        #: Lifetime given to faults without one; renewed every round.
        self.lease = float(lease) if lease is not None else max(2 * self.interval + 2 * scenario.timeout, 5.0)
        #: Rounds applied so far (the first one on entry).
        self.rounds = 0
        #: Reports of the last round.
        self.last_reports: List[Dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> Repeat:
        sc = self.scenario
        with sc._lock:
            if sc._repeat is not None:
                raise RuntimeError("this scenario is already repeating; leave the other repeat() block first")
            sc._repeat = self
        try:
            self.last_reports = sc._apply_round(self.lease, strict=True)
            self.rounds = 1
        except BaseException:
            sc._repeat = None
            try:
                sc.revert()
            except ChaosError as err:
                log.warning("lymph-chaos: reverting after a failed first round: %s", err)
            raise
        self._thread = threading.Thread(target=self._run, name=f"lymph-chaos-repeat {sc.id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            next_round = started + self.rounds * self.interval
            if self._stop.wait(max(0.0, next_round - time.monotonic())):
                return
            try:
                self.last_reports = self.scenario._apply_round(self.lease, strict=False)
            except ChaosError as err:
                self.scenario._record_error(err)
            except Exception as err:
                log.exception("lymph-chaos: round failed")
                self.scenario._record_error(ChaosError(f"{type(err).__name__}: {err}", type="ClientError"))
            self.rounds += 1

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.scenario._repeat = None
        try:
            self.scenario.revert()
        except ChaosError as err:
            if exc_type is None:
                raise
            log.warning("lymph-chaos: reverting after %s: %s", exc_type.__name__, err)


def agent_host(endpoint: str) -> str:
    """The host of an agent: the address (or name) in its endpoint, ``tcp://10.0.0.2:4575`` → ``10.0.0.2`` (the
    endpoint itself when it has no ``tcp://host:port`` form); as ``chaos_api::scenario::agent_host``."""
    if endpoint.startswith("tcp://") and ":" in endpoint[6:]:
        host = endpoint[6:].rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return endpoint


def _failure(agent: str, err: ChaosError) -> Dict[str, str]:
    return {"agent": agent, "host": agent_host(agent), "error": str(err)}


def _with_agent(item: Any, agent: str) -> Dict[str, Any]:
    out = dict(item) if isinstance(item, dict) else {"value": item}
    out["agent"] = agent
    out["host"] = agent_host(agent)
    return out
