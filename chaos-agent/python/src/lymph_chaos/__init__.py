"""lymph-chaos client: drive the ``lymph-chaos`` agents from Python (the 2015 ``Scenario`` API).

    from lymph_chaos import Scenario        # also importable as lymph.chaos.Scenario
    sn = Scenario.from_zookeeper_host('127.0.0.1')
    sn.kill('echo')
    sn.inject_latency('demo', 1)
    with sn.repeat(interval=5):
        ...

It speaks lymph's RPC protocol itself (pyzmq and its own msgpack codec, :mod:`lymph_chaos.codec`) and finds the
agents (service ``Chaos``) in ZooKeeper (kazoo), so lymph itself need not be installed.
"""

from .discovery import Agent, ZooKeeperRegistry, zookeeper_hosts
from .errors import (
    BadArguments,
    ChaosError,
    ChaosTimeout,
    Conflict,
    InvalidArgument,
    KernelFeatureMissing,
    Nack,
    NetworkDisabled,
    NoAgentError,
    NoAgentForService,
    NotFound,
    NotOnThisHost,
    PartialFailure,
    Refused,
    UnknownFault,
    UnknownService,
    ZooKeeperUnavailable,
)
from .rpc import RpcNode
from .scenario import Action, Repeat, Scenario

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Agent",
    "BadArguments",
    "ChaosError",
    "ChaosTimeout",
    "Conflict",
    "InvalidArgument",
    "KernelFeatureMissing",
    "Nack",
    "NetworkDisabled",
    "NoAgentError",
    "NoAgentForService",
    "NotFound",
    "NotOnThisHost",
    "PartialFailure",
    "Refused",
    "Repeat",
    "RpcNode",
    "Scenario",
    "UnknownFault",
    "UnknownService",
    "ZooKeeperRegistry",
    "ZooKeeperUnavailable",
    "__version__",
    "zookeeper_hosts",
]
