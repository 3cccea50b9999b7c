"""A real lymph 0.15 client that talks to the agent once, then watches lymph's own heartbeat to it.

Usage: ping_watch.py <config .lymph.yml> <service> <seconds>

It calls `<service>.status` (so lymph creates a `Connection` to the agent, which pings it every second), then
samples that connection for <seconds> and prints one JSON line:
  {"endpoint", "heartbeats" (pings answered), "max_silence" (longest time without any message from the agent,
   seconds), "statuses" (every connection status seen), "rtt_ms_max"}
"""
import json
import sys
import time

import lymph.monkey

lymph.monkey.patch()

import gevent  # noqa: E402
from lymph.client import Client  # noqa: E402
from lymph.config import Configuration  # noqa: E402


def main():
    config_path, service, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    config = Configuration()
    config.load_file(config_path)
    client = Client.from_config(config)
    reply = client.request(service, service + ".status", {}, timeout=5)
    endpoint = reply.body["endpoint"]
    connections = client.container.server.connections
    deadline = time.monotonic() + 5
    while endpoint not in connections and time.monotonic() < deadline:
        gevent.sleep(0.05)
    conn = connections[endpoint]
    statuses = set()
    max_silence = 0.0
    end = time.monotonic() + seconds
    start_count = conn.explicit_heartbeat_count
    while time.monotonic() < end:
        gevent.sleep(0.05)
        if conn.last_seen:
            max_silence = max(max_silence, time.monotonic() - conn.last_seen)
        statuses.add(conn.status)
    samples = list(conn.heartbeat_samples.values) if hasattr(conn.heartbeat_samples, "values") else []
    print(json.dumps({
        "endpoint": endpoint,
        "heartbeats": conn.explicit_heartbeat_count - start_count,
        "max_silence": max_silence,
        "statuses": sorted(statuses),
        "rtt_ms_max": max(samples) if samples else None,
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
