"""Exceptions raised by the Scenario client.

Every error an agent reports comes back as a lymph ``ERROR`` reply with a body ``{"type": ..., "message": ...}``;
:func:`error_from_reply` turns it into the subclass of :class:`ChaosError` named like that ``type`` (so
``except UnknownService`` works), falling back to :class:`ChaosError` itself for types this client does not know.
Errors found on the client side (no agent, unknown service, timeouts) use the same classes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Type


class ChaosError(Exception):
    """An error from a Chaos agent or from talking to one.

    Attributes:
        type: the agent's error type name (``"UnknownService"``, ``"ValueError"``, …) or the client's own
            (``"NoAgent"``, ``"Timeout"``, ``"Nack"``).
        message: the human-readable message, as the agent wrote it.
        agent: endpoint of the agent that answered (``tcp://host:port``), when one did.
    """

    #: Type name used when the class is raised on the client side.
    default_type = "ChaosError"

    def __init__(self, message: str, type: Optional[str] = None, agent: Optional[str] = None) -> None:
        super().__init__(message)
        self.type: str = type or self.default_type
        self.message: str = message
        self.agent: Optional[str] = agent

    def __str__(self) -> str:
        where = f" (agent {self.agent})" if self.agent else ""
        return f"{self.type}: {self.message}{where}"


class UnknownService(ChaosError):
    """No agent knows a service of that name (exactly, or as the only case-insensitive match)."""

    default_type = "UnknownService"


class NotOnThisHost(ChaosError):
    """The agent knows the service but has no instance of it on its host."""

    default_type = "NotOnThisHost"


class NoAgentForService(ChaosError):
    """The service is registered, but no Chaos agent reports an instance of it on its own host."""

    default_type = "NoAgentForService"


class NotFound(ChaosError):
    """No such instance, process or listener on the agent's host."""

    default_type = "NotFound"


class Refused(ChaosError):
    """A guard of the agent refused the fault (protected process, share cap, …)."""

    default_type = "Refused"


class KernelFeatureMissing(ChaosError):
    """The agent's kernel lacks what the fault needs (e.g. ``sch_netem`` for latency)."""

    default_type = "KernelFeatureMissing"


class Conflict(ChaosError):
    """The fault conflicts with one already active on the same ports."""

    default_type = "Conflict"


class NetworkDisabled(ChaosError):
    """The agent runs without network control (``--no-network-control``)."""

    default_type = "NetworkDisabled"


class UnknownFault(ChaosError):
    """No active fault with that id (already reverted or expired)."""

    default_type = "UnknownFault"


class InvalidArgument(ChaosError, ValueError):
    """The agent rejected an argument's value (agent type ``ValueError``)."""

    default_type = "ValueError"


class BadArguments(ChaosError, TypeError):
    """The agent rejected the arguments themselves: unknown, missing or of the wrong type (agent ``TypeError``)."""

    default_type = "TypeError"


class Nack(ChaosError):
    """The peer answered NACK: no such interface or method, or it failed without a declared error."""

    default_type = "Nack"


class ChaosTimeout(ChaosError, TimeoutError):
    """No reply within the timeout."""

    default_type = "Timeout"


class NoAgentError(ChaosError):
    """No Chaos agent is reachable: none registered in ZooKeeper, or none answered within the timeout."""

    default_type = "NoAgent"


class ZooKeeperUnavailable(NoAgentError):
    """ZooKeeper itself cannot be reached, so no agent can be found."""

    default_type = "ZooKeeperUnavailable"


class PartialFailure(ChaosError):
    """Some agents failed (did not answer, refused) while the others acted.

    Attributes:
        failures: one dict per failed agent: ``agent`` (endpoint), ``host`` (the address in it), ``error`` (text).
        reports: what the agents that acted answered (for :meth:`Scenario.events`: their merged events).
    """

    default_type = "Partial"

    def __init__(self, failures: List[Dict[str, str]], reports: List[Dict[str, Any]]) -> None:
        each = "; ".join(f"host {f['host']} ({f['agent']}): {f['error']}" for f in failures)
        super().__init__(f"{len(failures)} agent(s) failed while the others acted ({len(reports)} answers): {each}")
        self.failures: List[Dict[str, str]] = failures
        self.reports: List[Dict[str, Any]] = reports


#: Agent error type name → exception class.
ERROR_TYPES: Dict[str, Type[ChaosError]] = {
    "UnknownService": UnknownService,
    "NotOnThisHost": NotOnThisHost,
    "NotFound": NotFound,
    "Refused": Refused,
    "KernelFeatureMissing": KernelFeatureMissing,
    "Conflict": Conflict,
    "NetworkDisabled": NetworkDisabled,
    "UnknownFault": UnknownFault,
    "ValueError": InvalidArgument,
    "TypeError": BadArguments,
}


def error_from_reply(type_name: str, message: str, agent: Optional[str] = None) -> ChaosError:
    """The exception for an ``ERROR`` reply ``{"type": type_name, "message": message}`` from ``agent``."""
    cls = ERROR_TYPES.get(type_name, ChaosError)
    return cls(message, type=type_name, agent=agent)
