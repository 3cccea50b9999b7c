"""The demo's client: a real lymph 0.15 client that calls `Echo.whoami` at a fixed rate and prints one line per
call, when it completes:

    client +12.345s #123 ok 1.8 ms pid 4242
    client +13.012s #130 error Timeout 1000.4 ms

Usage: client.py <config .lymph.yml> [--rate 10] [--timeout 1.0]

Calls are started on a fixed schedule (each in its own greenlet), so a slow or lost reply never lowers the rate;
each call has its own timeout. `+t` is the time the call was started, since the client started. Runs until
SIGTERM/SIGINT. Started by `cargo xtask demo` (xtask/src/demo.rs).
"""
import argparse
import signal
import sys
import time

import lymph.monkey

lymph.monkey.patch()

import gevent  # noqa: E402
from lymph.client import Client  # noqa: E402
from lymph.config import Configuration  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()

    config = Configuration()
    config.load_file(args.config)
    client = Client.from_config(config)
    start = time.monotonic()
    stopping = []
    gevent.signal_handler(signal.SIGTERM, stopping.append, True)
    gevent.signal_handler(signal.SIGINT, stopping.append, True)

    def call(n, started):
        t0 = time.monotonic()
        try:
            reply = client.request("Echo", "Echo.whoami", {"text": "call %d" % n}, timeout=args.timeout)
            ms = (time.monotonic() - t0) * 1000
            line = "client +%.3fs #%d ok %.1f ms pid %s" % (started, n, ms, reply.body["pid"])
        except Exception as exc:  # Timeout, Nack, RemoteError, LookupFailure, …
            ms = (time.monotonic() - t0) * 1000
            line = "client +%.3fs #%d error %s %.1f ms" % (started, n, type(exc).__name__, ms)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    n = 0
    period = 1.0 / args.rate
    while not stopping:
        started = time.monotonic() - start
        gevent.spawn(call, n, started)
        n += 1
        # Next tick on the fixed schedule (no drift).
        gevent.sleep(max(0.0, start + n * period - time.monotonic()))
    client.container.stop()


if __name__ == "__main__":
    main()
