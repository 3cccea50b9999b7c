"""Finding Chaos agents in ZooKeeper, the way lymph finds any service.

lymph's layout (``lymph/discovery/zookeeper.py``): under the chroot (``/lymph`` unless the hosts string names
another), every instance of a service is an ephemeral node ``/services/<name>/<id>`` whose data is a JSON object
with at least ``endpoint`` (``tcp://ip:port``) and usually ``hostname``, ``ip``, ``identity``. Agents register as
the service ``Chaos``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .errors import ZooKeeperUnavailable

log = logging.getLogger(__name__)

#: lymph's default chroot.
DEFAULT_CHROOT = "/lymph"
#: ZooKeeper's default client port.
DEFAULT_PORT = 2181
#: The service name agents register under.
AGENT_SERVICE = "Chaos"


@dataclass(frozen=True)
class Agent:
    """One Chaos agent as registered in ZooKeeper."""

    #: RPC endpoint, ``tcp://ip:port``.
    endpoint: str
    #: Name of its znode (the lymph instance id).
    id: str
    #: Host name from the registration, when given.
    hostname: Optional[str] = None
    #: IP from the registration, when given.
    ip: Optional[str] = None
    #: The whole registration.
    data: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def zookeeper_hosts(host: str = "127.0.0.1", port: int = DEFAULT_PORT, chroot: Optional[str] = DEFAULT_CHROOT) -> str:
    """The kazoo hosts string for ``host``.

    ``host`` may be a bare host (``"127.0.0.1"``: ``port`` and ``chroot`` are added), ``"host:port"``, a
    comma-separated list (``"zk1,zk2:2182"``: hosts without a port get ``port``), and may end with its own chroot
    (``"127.0.0.1:2181/other"``), which wins over ``chroot``. ``chroot=None`` or ``""`` means none (the
    ZooKeeper root).

    >>> zookeeper_hosts("127.0.0.1")
    '127.0.0.1:2181/lymph'
    >>> zookeeper_hosts("zk1,zk2:2182/x", port=2000)
    'zk1:2000,zk2:2182/x'
    """
    host = host.strip()
    if not host:
        raise ValueError("empty ZooKeeper host")
    servers, slash, own_chroot = host.partition("/")
    if slash:
        chroot = "/" + own_chroot.strip("/") if own_chroot.strip("/") else None
    parts = []
    for server in servers.split(","):
        server = server.strip()
        if not server:
            continue
        if server.startswith("["):  # [v6]:port
            has_port = "]:" in server
        else:
            has_port = server.count(":") == 1
        parts.append(server if has_port else f"{server}:{port}")
    if not parts:
        raise ValueError(f"no ZooKeeper server in {host!r}")
    suffix = "/" + chroot.strip("/") if chroot and chroot.strip("/") else ""
    return ",".join(parts) + suffix


class ZooKeeperRegistry:
    """A kazoo client reading lymph's registry.

    Args:
        hosts: kazoo hosts string, with the chroot (see :func:`zookeeper_hosts`).
        timeout: seconds to wait for the connection.

    Raises:
        ZooKeeperUnavailable: no connection within ``timeout``.
    """

    def __init__(self, hosts: str, timeout: float = 2.0) -> None:
        from kazoo.client import KazooClient

        self.hosts = hosts
        self._zk = KazooClient(hosts=hosts)
        try:
            with warnings.catch_warnings():
                # kazoo warns when the chroot does not exist; agents() says so in its error instead.
                warnings.filterwarnings("ignore", message="No chroot path exists")
                self._zk.start(timeout=timeout)
        except Exception as err:  # noqa: BLE001 - kazoo raises its handler's timeout class, or socket errors
            self._close_quietly()
            raise ZooKeeperUnavailable(
                f"cannot connect to ZooKeeper at {hosts} within {timeout:g} s ({type(err).__name__}: {err})"
            ) from None

    def instances(self, service: str) -> List[Agent]:
        """Every registered instance of ``service`` (skipping nodes that vanish or hold no endpoint)."""
        from kazoo.exceptions import NoNodeError

        path = f"/services/{service}"
        try:
            children = self._zk.get_children(path)
        except NoNodeError:
            return []
        except Exception as err:  # noqa: BLE001 - ConnectionLoss, SessionExpired …
            raise ZooKeeperUnavailable(f"cannot list {path} in ZooKeeper at {self.hosts}: {err}") from None
        found = []
        for child in sorted(children):
            try:
                raw, _ = self._zk.get(f"{path}/{child}")
                data = json.loads(raw.decode("utf-8"))
            except NoNodeError:
                continue
            except (ValueError, UnicodeDecodeError) as err:
                log.warning("ignoring %s/%s: not a lymph registration (%s)", path, child, err)
                continue
            except Exception as err:  # noqa: BLE001 - as above
                raise ZooKeeperUnavailable(f"cannot read {path}/{child} in ZooKeeper at {self.hosts}: {err}") from None
            endpoint = data.get("endpoint") if isinstance(data, dict) else None
            if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
                log.warning("ignoring %s/%s: no tcp:// endpoint in %r", path, child, data)
                continue
            found.append(Agent(endpoint, child, data.get("hostname"), data.get("ip"), data))
        return found

    def agents(self) -> List[Agent]:
        """Every registered Chaos agent."""
        return self.instances(AGENT_SERVICE)

    def root_exists(self) -> bool:
        """Whether the chroot node exists (lymph creates it when the first service registers)."""
        try:
            return self._zk.exists("/") is not None
        except Exception as err:  # noqa: BLE001 - as above
            raise ZooKeeperUnavailable(f"cannot read ZooKeeper at {self.hosts}: {err}") from None

    def close(self) -> None:
        """Closes the session."""
        self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            self._zk.stop()
            self._zk.close()
        except Exception:  # noqa: BLE001 - closing a broken client
            pass
