"""Experiment files (the format of ``lymph-chaos run``) from Python: run a file's *method* while a block of code runs,
and use its *steady-state probes* as assertions.

    from lymph_chaos.experiment import Experiment

    exp = Experiment.load("echo-experiment.yml")
    with exp.method("127.0.0.1:2181/lymph"):       # faults applied as the method says, all reverted on exit
        ...
    exp.assert_steady_state("127.0.0.1:2181/lymph")   # AssertionError naming the probe and what did not hold

The file format is the one ``lymph-chaos run`` documents (README, "Chaos experiments"). This module reads the parts
it runs — ``title``, ``method`` (``fault``, ``pause``, ``repeat``, ``parallel``, ``serial``) and the probes of
``steady_state`` / ``safeguards`` (``rpc``, ``registry``, ``http`` with ``success``, ``latency``, ``reply``,
``status``, ``body``, ``min_instances``, ``max_instances``) — and reports problems with the file, line and key. The
agents check every fault's parameters themselves when it is applied. Safeguards are not watched here: run the file
with ``lymph-chaos run`` for that, and for the report and its picture.

Every lasting fault is applied with a short *lease* (a lifetime of at most :data:`LEASE` seconds) that a background
thread renews while the fault should last, so the agents end it themselves soon after a crashed test process.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .discovery import ZooKeeperRegistry
from .errors import ChaosError
from .rpc import RpcNode
from .scenario import Scenario

log = logging.getLogger("lymph_chaos.experiment")

#: Longest lifetime a fault gets at once (renewed while it should last).
LEASE = 10.0

STEP_KINDS = ("fault", "pause", "repeat", "parallel", "serial")
FAULT_KINDS = (
    "latency",
    "delay",
    "loss",
    "duplicate",
    "corrupt",
    "reorder",
    "rate",
    "blackhole",
    "observe",
    "cpu",
    "memory",
    "disk",
    "kill",
    "terminate",
    "pause",
)
INSTANT_KINDS = ("kill", "terminate")


class ExperimentError(ValueError):
    """The experiment file is not valid: the message names the file, the line and the key."""


def parse_duration(value: Any, where: str = "duration") -> float:
    """Seconds from ``1.5``, ``"200ms"``, ``"5s"``, ``"2m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ExperimentError(f"{where}: {value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ExperimentError(f"{where}: {value!r} is negative")
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|sec|m|min|h)?\s*", str(value))
    if not match:
        raise ExperimentError(f"{where}: {value!r} is not a duration (write 1.5, 200ms, 5s, 2m)")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


def parse_share(value: Any, where: str) -> float:
    """A share from ``"99%"`` or a ratio in [0, 1]."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            p = float(value.strip()[:-1])
        except ValueError:
            p = -1
        if 0 <= p <= 100:
            return p / 100
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ExperimentError(f"{where}: {value!r} is not a share: write a percentage (99%) or a ratio (0.99)")


# -- loading, with lines ---------------------------------------------------------------------------------------


def _load_yaml(text: str, file: str) -> Tuple[Any, Dict[Tuple[Any, ...], int]]:
    """The document and a map key path → 1-based line (from PyYAML's nodes)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ExperimentError(f"{file}{line}: not valid YAML: {err}") from None
    lines: Dict[Tuple[Any, ...], int] = {}

    def walk(n: Any, path: Tuple[Any, ...]) -> None:
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


def _path_text(path: Sequence[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


@dataclass
class Step:
    """One method step."""

    path: str
    kind: str
    spec: Dict[str, Any]
    children: List[Step] = field(default_factory=list)


@dataclass
class Probe:
    """A steady-state probe or safeguard, as the file defines it."""

    name: str
    kind: str  # rpc, registry, http
    target: Dict[str, Any]
    every: float = 0.5
    window: float = 5.0
    timeout: float = 1.0
    tolerance: Dict[str, Any] = field(default_factory=dict)


class Experiment:
    """A parsed experiment file (see the module docs)."""

    def __init__(
        self, data: Dict[str, Any], file: str = "<experiment>", lines: Optional[Dict[Tuple[Any, ...], int]] = None
    ):
        self.file = file
        self._lines = lines or {}
        if not isinstance(data, dict):
            raise self._error((), "the top level must be a mapping with title and method")
        for key in data:
            if key not in (
                "title",
                "description",
                "tags",
                "zookeeper",
                "seed",
                "dry_run",
                "steady_state",
                "method",
                "safeguards",
            ):
                raise self._error((key,), f"unknown key `{key}`")
        if not isinstance(data.get("title"), str):
            raise self._error(("title",), "`title` (text) is required")
        self.title: str = data["title"]
        self.zookeeper: Optional[str] = data.get("zookeeper")
        self.seed: Optional[int] = data.get("seed")
        self.dry_run: bool = bool(data.get("dry_run", False))
        method = data.get("method")
        if not isinstance(method, list):
            raise self._error(("method",), "`method` (a list of steps) is required")
        self.steps: List[Step] = [self._step(s, ("method", i)) for i, s in enumerate(method)]
        steady = data.get("steady_state") or {}
        if not isinstance(steady, dict):
            raise self._error(("steady_state",), "a mapping with `probes`")
        self.probes: List[Probe] = [
            self._probe(p, ("steady_state", "probes", i)) for i, p in enumerate(steady.get("probes") or [])
        ]
        self.safeguards: List[Probe] = [
            self._probe(p, ("safeguards", i)) for i, p in enumerate(data.get("safeguards") or [])
        ]

    @classmethod
    def load(cls, path: str) -> Experiment:
        """Reads and checks a file."""
        with open(path, encoding="utf-8") as fh:
            return cls.parse(fh.read(), str(path))

    @classmethod
    def parse(cls, text: str, file: str = "<experiment>") -> Experiment:
        """Parses and checks YAML text."""
        data, lines = _load_yaml(text, file)
        return cls(data, file, lines)

    def _error(self, path: Tuple[Any, ...], message: str) -> ExperimentError:
        line = None
        p = tuple(path)
        while line is None and p:
            line = self._lines.get(p)
            p = p[:-1]
        where = f"{self.file}:{line}" if line else self.file
        return ExperimentError(f"{where}: {_path_text(path)}: {message}")

    def _step(self, raw: Any, path: Tuple[Any, ...]) -> Step:
        if not isinstance(raw, dict) or not raw:
            raise self._error(path, "a step is a mapping starting with fault, pause, repeat, parallel or serial")
        kind = next(iter(raw))
        if kind not in STEP_KINDS:
            raise self._error(
                path + (kind,), f"a step starts with its type: `{kind}` is not one of {', '.join(STEP_KINDS)}"
            )
        where = _path_text(path)
        if kind == "fault":
            if raw["fault"] not in FAULT_KINDS:
                raise self._error(
                    path + ("fault",), f"unknown fault kind `{raw['fault']}`; kinds: {', '.join(FAULT_KINDS)}"
                )
            if "lifetime" in raw:
                parse_duration(raw["lifetime"], f"{where}.lifetime")
            if "service" not in raw and raw["fault"] not in ("cpu", "memory", "disk"):
                raise self._error(path, f"a {raw['fault']} fault needs `service`")
            return Step(where, kind, dict(raw))
        for key in raw:
            if key not in (kind, "name"):
                raise self._error(path + (key,), f"unknown key `{key}` in a {kind} step")
        if kind == "pause":
            try:
                parse_duration(raw["pause"], f"{where}.pause")
            except ExperimentError as err:
                raise self._error(path + ("pause",), str(err).split(": ", 1)[-1]) from None
            return Step(where, kind, dict(raw))
        if kind == "repeat":
            spec = raw["repeat"]
            if not isinstance(spec, dict) or "steps" not in spec or "every" not in spec:
                raise self._error(path + ("repeat",), "repeat takes every, times or for, and steps")
            for key in spec:
                if key not in ("every", "times", "for", "steps"):
                    raise self._error(path + ("repeat", key), f"unknown key `{key}` in repeat")
            if ("times" in spec) == ("for" in spec):
                raise self._error(path + ("repeat",), "repeat takes `times` (rounds) or `for` (a duration)")
            children = [self._step(s, path + ("repeat", "steps", i)) for i, s in enumerate(spec["steps"] or [])]
            return Step(where, kind, dict(spec), children)
        branches = raw[kind]
        if not isinstance(branches, list):
            raise self._error(path + (kind,), f"{kind} takes a list of steps")
        return Step(where, kind, {}, [self._step(s, path + (kind, i)) for i, s in enumerate(branches)])

    def _probe(self, raw: Any, path: Tuple[Any, ...]) -> Probe:
        if not isinstance(raw, dict) or "name" not in raw:
            raise self._error(path, "a probe is a mapping with a name")
        allowed = (
            "name",
            "rpc",
            "registry",
            "http",
            "every",
            "window",
            "timeout",
            "check",
            "failure_threshold",
            "tolerance",
        )
        for key in raw:
            if key not in allowed:
                raise self._error(path + (key,), f"unknown key `{key}` in a probe")
        kinds = [k for k in ("rpc", "registry", "http") if k in raw]
        if len(kinds) != 1:
            raise self._error(path, f"probe `{raw['name']}` needs exactly one of rpc, registry, http")
        kind = kinds[0]
        target = dict(raw[kind] or {})
        if kind == "rpc" and "." not in str(target.get("call", "")):
            raise self._error(path + ("rpc",), "rpc.call is Service.method")
        where = _path_text(path)
        tolerance = dict(raw.get("tolerance") or {})
        for key in tolerance:
            if key not in (
                "success",
                "latency",
                "reply",
                "status",
                "body",
                "min_instances",
                "max_instances",
                "min_samples",
            ):
                raise self._error(path + ("tolerance", key), f"unknown key `{key}` in a tolerance")
        if "success" in tolerance:
            tolerance["success"] = parse_share(tolerance["success"], f"{where}.tolerance.success")
        for q, limit in (tolerance.get("latency") or {}).items():
            tolerance["latency"][q] = parse_duration(limit, f"{where}.tolerance.latency.{q}")
        return Probe(
            name=str(raw["name"]),
            kind=kind,
            target=target,
            every=parse_duration(raw.get("every", 0.5), f"{where}.every"),
            window=parse_duration(raw.get("window", 5), f"{where}.window"),
            timeout=parse_duration(raw.get("timeout", 1), f"{where}.timeout"),
            tolerance=tolerance,
        )

    # -- running ---------------------------------------------------------------------------------------------

    def method(self, zookeeper: str, dry_run: bool = False, timeout: float = 2.0) -> MethodRun:
        """A context manager running the method in a background thread while its block runs; every fault is
        reverted on exit (also when the block raises)."""
        return MethodRun(self, zookeeper, dry_run=dry_run or self.dry_run, timeout=timeout)

    def check_steady_state(self, zookeeper: str, timeout: float = 2.0) -> List[Verdict]:
        """Runs every steady-state probe over its window (at the same time); returns the verdicts."""
        return check_probes(self.probes, zookeeper, timeout)

    def assert_steady_state(self, zookeeper: str, timeout: float = 2.0) -> None:
        """Like :meth:`check_steady_state`; raises AssertionError naming every probe that did not hold."""
        verdicts = self.check_steady_state(zookeeper, timeout)
        failed = [v for v in verdicts if not v.held]
        if failed:
            explained = "; ".join(v.explain() for v in failed)
            raise AssertionError(f"steady state of {self.title!r} did not hold: {explained}")


# -- the method ------------------------------------------------------------------------------------------------


class MethodRun:
    """The method of an experiment running in a background thread (see :meth:`Experiment.method`)."""

    def __init__(self, experiment: Experiment, zookeeper: str, dry_run: bool = False, timeout: float = 2.0) -> None:
        self.experiment = experiment
        self.zookeeper = zookeeper
        self.dry_run = dry_run
        self.timeout = timeout
        #: Errors of the method (a fault an agent refused …); the block still runs.
        self.errors: List[BaseException] = []
        #: (seconds since the start, step, what happened)
        self.log: List[Tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._scenarios: Dict[str, Scenario] = {}
        self._leases: Dict[str, Optional[float]] = {}
        self._thread: Optional[threading.Thread] = None
        self._renewer: Optional[threading.Thread] = None
        self._t0 = 0.0
        self.done = threading.Event()
        #: Set once the method's first step is done (the block starts with its faults in place).
        self.started = threading.Event()

    def __enter__(self) -> MethodRun:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="lymph-chaos method", daemon=True)
        self._thread.start()
        self.started.wait(self.timeout * 4 + 5)
        if self.errors:
            self.stop()
            raise self.errors[0]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stops the method and reverts every fault it applied.

        The method and lease threads are joined first: a request they have in flight reaches its agent before the
        faults are reverted, so none is applied again after the revert.
        """
        self._stop.set()
        for thread in (self._thread, self._renewer):
            if thread is not None:
                thread.join(self.timeout * 4 + 5)
        with self._lock:
            scenarios = list(self._scenarios.values())
            self._scenarios.clear()
        for sn in scenarios:
            try:
                sn.revert()
            except ChaosError as err:
                log.warning("lymph-chaos: could not revert %s (its lease ends it within %.0f s): %s", sn.id, LEASE, err)
                self.errors.append(err)
            finally:
                sn.close()

    def _record(self, step: str, what: str) -> None:
        self.log.append((time.monotonic() - self._t0, step, what))

    def _sleep(self, seconds: float) -> bool:
        """Sleeps; False when stopped."""
        return not self._stop.wait(max(0.0, seconds))

    def _main(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name="lymph-chaos leases", daemon=True)
        self._renewer.start()
        try:
            for i, step in enumerate(self.experiment.steps):
                self._step(step)
                if i == 0:
                    self.started.set()
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - kept for the test to see; reverted at exit
            log.warning("lymph-chaos method stopped: %s", err)
            self.errors.append(err)
        finally:
            self.started.set()
            self.done.set()

    def _steps(self, steps: Sequence[Step]) -> None:
        for step in steps:
            self._step(step)

    def _step(self, step: Step) -> None:
        if self._stop.is_set():
            raise _Stopped()
        if step.kind == "fault":
            self._fault(step)
        elif step.kind == "pause":
            if not self._sleep(parse_duration(step.spec["pause"])):
                raise _Stopped()
        elif step.kind == "serial":
            self._steps(step.children)
        elif step.kind == "parallel":
            threads = [threading.Thread(target=self._branch, args=(c,), daemon=True) for c in step.children]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        elif step.kind == "repeat":
            every = parse_duration(step.spec["every"])
            start = time.monotonic()
            rounds = step.spec.get("times")
            until = start + parse_duration(step.spec["for"]) if "for" in step.spec else None
            n = 0
            while True:
                self._steps(step.children)
                n += 1
                nxt = start + n * every
                if (rounds is not None and n >= int(rounds)) or (until is not None and nxt >= until):
                    break
                if not self._sleep(nxt - time.monotonic()):
                    raise _Stopped()

    def _branch(self, step: Step) -> None:
        try:
            self._step(step)
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001
            self.errors.append(err)

    def _fault(self, step: Step) -> None:
        spec = dict(step.spec)
        kind = spec.pop("fault")
        service = spec.pop("service", None)
        spec.pop("name", None)
        lifetime = parse_duration(spec.pop("lifetime")) if "lifetime" in spec else None
        with self._lock:
            sn = self._scenarios.get(step.path)
            fresh = sn is None
            if sn is None:
                sn = Scenario(self.zookeeper, timeout=self.timeout, dry_run=self.dry_run)
                self._scenarios[step.path] = sn
        if fresh:
            params = dict(spec)
            if kind not in INSTANT_KINDS:
                params["lifetime"] = min(lifetime, LEASE) if lifetime is not None else LEASE
            if not service:
                raise ExperimentError(
                    f"{step.path}: a {kind} fault without `service` (host-wide) runs with lymph-chaos run only"
                )
            sn.inject(service, kind, **params)
        reports = sn.apply()
        self._record(step.path, f"{kind} {service or ''}: " + "; ".join(str(r.get("message", "")) for r in reports))
        if kind not in INSTANT_KINDS and not self.dry_run:
            with self._lock:
                self._leases[step.path] = time.monotonic() + lifetime if lifetime is not None else None

    def _renew(self) -> None:
        """Renews the lease of every lasting fault until its lifetime ends or the method is stopped."""
        while self._sleep(LEASE / 3):
            with self._lock:
                due = [(p, end, self._scenarios.get(p)) for p, end in self._leases.items()]
            for path, end, sn in due:
                if sn is None or self._stop.is_set():
                    continue
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= LEASE / 3:
                    with self._lock:
                        self._leases.pop(path, None)
                    continue
                for action in sn.actions:
                    action.params["lifetime"] = LEASE if remaining is None else min(LEASE, remaining)
                try:
                    sn.apply()
                except ChaosError as err:
                    log.warning("lymph-chaos: renewing %s: %s", path, err)


class _Stopped(Exception):
    pass


# -- probes ------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement: when it started (seconds since the check started), ok, latency, error."""

    t: float
    ok: bool
    latency: Optional[float] = None
    error: Optional[str] = None


@dataclass
class Verdict:
    """Whether a probe held over its window."""

    probe: str
    held: bool
    samples: List[Sample]
    failures: List[str]

    def __bool__(self) -> bool:
        return self.held

    def explain(self) -> str:
        ok = sum(1 for s in self.samples if s.ok)
        return f"{self.probe}: {ok}/{len(self.samples)} samples ok; " + (
            "held" if self.held else "; ".join(self.failures)
        )


def _matches(matcher: Dict[str, Any], value: Any) -> bool:
    text = value if isinstance(value, str) else json.dumps(value)
    if "equals" in matcher:
        return bool(value == matcher["equals"])
    if "contains" in matcher:
        return str(matcher["contains"]) in text
    if "regex" in matcher:
        return re.search(str(matcher["regex"]), text) is not None
    return True


def _percentile(values: List[float], q: str) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    if q == "max":
        return ordered[-1]
    p = float(q[1:])
    rank = min(len(ordered), max(1, math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


class _Sampler:
    def __init__(self, zookeeper: str, timeout: float) -> None:
        self.registry = ZooKeeperRegistry(zookeeper, timeout)
        self.node: Optional[RpcNode] = None

    def close(self) -> None:
        if self.node is not None:
            self.node.close()
        self.registry.close()

    def sample(self, probe: Probe, t: float) -> Sample:
        started = time.monotonic()
        tol = probe.tolerance
        try:
            if probe.kind == "registry":
                n = len(self.registry.instances(probe.target["service"]))
                low, high = tol.get("min_instances", 1), tol.get("max_instances")
                if n < low or (high is not None and n > high):
                    return Sample(t, False, None, f"{n} instance(s) of {probe.target['service']}")
                return Sample(t, True)
            if probe.kind == "rpc":
                service = probe.target["call"].rsplit(".", 1)[0]
                instances = self.registry.instances(service)
                if not instances:
                    return Sample(t, False, time.monotonic() - started, f"LookupFailure: no instance of {service}")
                if self.node is None:
                    self.node = RpcNode("127.0.0.1")
                reply = self.node.request(
                    random.choice(instances).endpoint,
                    probe.target["call"],
                    probe.target.get("args") or {},
                    probe.timeout,
                )
                latency = time.monotonic() - started
                if "reply" in tol and not _matches(tol["reply"], reply):
                    return Sample(t, False, latency, f"reply {reply!r} does not match {tol['reply']}")
                return Sample(t, True, latency)
            return self._http(probe, t, started)
        except (ChaosError, OSError) as err:
            return Sample(t, False, time.monotonic() - started, f"{type(err).__name__}: {err}")

    def _http(self, probe: Probe, t: float, started: float) -> Sample:
        from urllib.parse import urlparse

        url = urlparse(probe.target["url"])
        method = str(probe.target.get("method", "GET")).upper()
        body = (probe.target.get("body") or "").encode()
        headers = "".join(f"{k}: {v}\r\n" for k, v in (probe.target.get("headers") or {}).items())
        target = f"{url.path or '/'}{'?' + url.query if url.query else ''}"
        request = f"{method} {target} HTTP/1.1\r\nHost: {url.hostname}\r\nConnection: close\r\n{headers}"
        if body:
            request += f"Content-Length: {len(body)}\r\n"
        with socket.create_connection((url.hostname, url.port or 80), timeout=probe.timeout) as sock:
            sock.settimeout(probe.timeout)
            sock.sendall(request.encode() + b"\r\n" + body)
            data = b""
            while len(data) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        latency = time.monotonic() - started
        text = data.decode("utf-8", "replace")
        try:
            status = int(text.split(" ", 2)[1])
        except (IndexError, ValueError):
            return Sample(t, False, latency, "not an HTTP response")
        accepted = probe.tolerance.get("status", "200-399")
        if not _status_ok(status, accepted):
            return Sample(t, False, latency, f"HTTP status {status}")
        if "body" in probe.tolerance and not _matches(probe.tolerance["body"], text.split("\r\n\r\n", 1)[-1]):
            return Sample(t, False, latency, "body does not match")
        return Sample(t, True, latency)


def _status_ok(status: int, accepted: Any) -> bool:
    for item in accepted if isinstance(accepted, list) else [accepted]:
        if isinstance(item, int) and status == item:
            return True
        s = str(item)
        if s.endswith("xx") and s[:-2].isdigit() and status // 100 == int(s[:-2]):
            return True
        if "-" in s:
            a, b = s.split("-", 1)
            if a.strip().isdigit() and b.strip().isdigit() and int(a) <= status <= int(b):
                return True
    return False


def judge(probe: Probe, samples: List[Sample]) -> Verdict:
    """Judges a window of samples against the probe's tolerance (as ``lymph-chaos run`` does)."""
    tol = probe.tolerance
    failures: List[str] = []
    if len(samples) < int(tol.get("min_samples", 1)):
        failures.append(f"{len(samples)} sample(s), fewer than {tol.get('min_samples', 1)}")
        return Verdict(probe.name, False, samples, failures)
    good = sum(1 for s in samples if s.ok)
    success = good / len(samples)
    want = float(tol.get("success", 1.0))
    if success + 1e-9 < want:
        errors = sorted({s.error for s in samples if s.error})
        failures.append(
            f"success {success * 100:.1f}% < {want * 100:.1f}% ({len(samples) - good} of {len(samples)} failed"
            + (f", e.g. {errors[0]})" if errors else ")")
        )
    latencies = [s.latency for s in samples if s.latency is not None]
    for q, limit in (tol.get("latency") or {}).items():
        v = _percentile(latencies, q)
        if v is not None and v > limit:
            failures.append(f"latency {q} {v * 1000:.1f} ms > {limit * 1000:.1f} ms")
    return Verdict(probe.name, not failures, samples, failures)


def check_probes(probes: Sequence[Probe], zookeeper: str, timeout: float = 2.0) -> List[Verdict]:
    """Runs every probe over its window (all at the same time, one sample every ``every``); returns the verdicts."""
    results: Dict[int, Verdict] = {}

    def one(i: int, probe: Probe) -> None:
        sampler = _Sampler(zookeeper, timeout)
        samples: List[Sample] = []
        start = time.monotonic()
        try:
            n = 0
            while True:
                at = start + n * probe.every
                if at - start >= probe.window:
                    break
                time.sleep(max(0.0, at - time.monotonic()))
                samples.append(sampler.sample(probe, time.monotonic() - start))
                n += 1
        finally:
            sampler.close()
        results[i] = judge(probe, samples)

    threads = [threading.Thread(target=one, args=(i, p), daemon=True) for i, p in enumerate(probes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(probes))]


def probe(name: str = "probe", **spec: Any) -> Probe:
    """A probe from keyword arguments shaped like the file's (``rpc={'call': 'Echo.upper', 'args': {...}}``,
    ``every``, ``window``, ``timeout``, ``tolerance={...}``)."""
    exp = Experiment({"title": "probe", "method": [], "safeguards": [dict(spec, name=name)]}, "<probe>")
    return exp.safeguards[0]
